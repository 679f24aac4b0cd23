"""Training data: the bundled GPT-NeoX-20B tokenizer, text readers, a token cache, and random-window batches.

- Sources: the bundled Gutenberg sample (`"sample"`, the default), an xz/gzip/plain JSON Lines file (one document per
  line, text in `"text"`), a `.txt` file (one document), a folder of such files, a glob, or `hf:NAME[:CONFIG]` for a
  Hugging Face dataset (optional extra `memoryformer[hf]`).
- Splits: in a folder, files named `*.val.*` / `*valid*` / `*validation*` / `*dev*` are validation and `*test*` files
  are skipped; everything else is training text. With no validation file (or a single file), the last
  `val_fraction` of the token stream, starting at a document boundary, is held out.
- Tokens are written once to a flat uint16 file (`<|endoftext|>` after every document) under the cache directory
  (`$MEMORYFORMER_CACHE`, default `~/.cache/memoryformer`), keyed by the SHA-256 of each source file's content and
  of the tokenizer, and read back as a memory map. The entry's own SHA-256 is checked on every load (about 2-3 s per
  GB, `verify=False` skips it) and a damaged entry is rebuilt. A source is hashed again only when its size, mtime or
  ctime changed (recorded under `CACHE/sources/`), so an in-place edit that keeps size and mtime is still seen.
- `WindowSampler` draws training windows of `seq_len + 1` tokens at uniformly random offsets from a seeded
  generator whose state is the data position saved in checkpoints.
"""

from __future__ import annotations

import functools
import glob as globlib
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from memoryformer.config import SAMPLE, MemoryFormerError
from memoryformer.integrity import file_matches, finish_file, remembered_digest, sha256_file

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS / "tokenizer.json"
SAMPLE_FILES = {"train": ASSETS / "sample.train.jsonl.xz", "val": ASSETS / "sample.val.jsonl.xz"}
EOT_ID = 0  # <|endoftext|> in the GPT-NeoX-20B vocabulary
CACHE_FORMAT = 2  # bump when the cached token layout or its key changes
TEXT_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".txt", ".txt.xz", ".txt.gz")
_VAL_WORDS = {"val", "valid", "validation", "dev"}
_TEST_WORDS = {"test"}
log = logging.getLogger("memoryformer")


class DataError(MemoryFormerError):
    """A data source is missing, empty, unreadable or too short."""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The bundled GPT-NeoX-20B `tokenizers.Tokenizer` (50,277 tokens; id 0 = <|endoftext|>)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER_FILE))


@functools.lru_cache(maxsize=1)
def tokenizer_hash() -> str:
    return hashlib.sha256(TOKENIZER_FILE.read_bytes()).hexdigest()


def encode(text: str) -> list[int]:
    """Token ids of `text` (no special tokens added)."""
    return get_tokenizer().encode(text, add_special_tokens=False).ids


def decode(ids) -> str:
    return get_tokenizer().decode(list(ids), skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------------------------
# Sources and splits


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMORYFORMER_CACHE") or Path.home() / ".cache" / "memoryformer")


def _split_of(path: Path) -> str:
    words = set(re.split(r"[._\-\s]+", path.name.lower()))
    if words & _VAL_WORDS:
        return "val"
    if words & _TEST_WORDS:
        return "test"
    return "train"


def _is_text_file(path: Path) -> bool:
    return path.name.lower().endswith(TEXT_SUFFIXES)


def _expand(data: str) -> list[Path]:
    """Files named by `data` (a file, a folder searched recursively, or a glob), sorted."""
    if any(ch in data for ch in "*?["):
        files = [Path(p) for p in sorted(globlib.glob(os.path.expanduser(data), recursive=True))]
        files = [p for p in files if p.is_file() and _is_text_file(p)]
        if not files:
            raise DataError(f"{data}: the pattern matches no {'/'.join(TEXT_SUFFIXES)} file")
        return files
    path = Path(os.path.expanduser(data))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p))
        if not files:
            raise DataError(f"{path}: folder holds no {'/'.join(TEXT_SUFFIXES)} file")
        return files
    if path.is_file():
        if not _is_text_file(path):
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(TEXT_SUFFIXES)})")
        return [path]
    raise DataError(f"{path}: no such file or folder")


@dataclass
class Split:
    """Where one split's tokens come from: whole sources, or a slice of a held-out stream."""

    sources: list[str]  # file paths, or one "hf:..." spec
    hf_split: str | None = None
    part: str = "all"  # "all", or "head"/"tail" of the stream when val is held out of train


def plan_splits(data: str | None, val_data: str | None = None) -> dict[str, Split]:
    """{"train": Split, "val": Split} for a data spec (see module docstring)."""
    data = data or SAMPLE
    if data == SAMPLE:
        train = Split([str(SAMPLE_FILES["train"])])
        val = Split([str(SAMPLE_FILES["val"])])
    elif data.startswith("hf:"):
        train, val = Split([data], "train"), Split([data], "validation")
    else:
        files = _expand(data)
        by = {"train": [], "val": [], "test": []}
        for f in files:
            by[_split_of(f) if len(files) > 1 or Path(data).is_dir() else "train"].append(str(f))
        if not by["train"]:
            raise DataError(f"{data}: no training files (all files are named as val/test splits)")
        train = Split(by["train"])
        val = Split(by["val"]) if by["val"] else Split(by["train"], part="tail")
        if not by["val"]:
            train = Split(by["train"], part="head")
    if val_data:
        if val_data == SAMPLE:
            val = Split([str(SAMPLE_FILES["val"])])
        elif val_data.startswith("hf:"):
            val = Split([val_data], "validation")
        else:
            val = Split([str(f) for f in _expand(val_data)])
        if train.part == "head":
            train = Split(train.sources)
    return {"train": train, "val": val}


# ---------------------------------------------------------------------------------------------------------------
# Readers: each yields document strings and turns every decoding failure into a DataError naming the file.


def _open_text(path: Path):
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents of one file: each JSON Lines record's "text", or the whole of a .txt file."""
    path = Path(path)
    is_jsonl = ".jsonl" in path.name.lower()
    try:
        with _open_text(path) as f:
            if not is_jsonl:
                text = f.read()
                if text.strip():
                    yield text
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
                if rec["text"]:
                    yield rec["text"]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start} of a decoded chunk)") from None
    except (lzma.LZMAError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt compressed file ({e})") from None
    except EOFError:
        raise DataError(f"{path}: truncated compressed file") from None


def _hf_documents(spec: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need the optional extra: pip install 'memoryformer[hf]'") from None
    name, _, config = spec[3:].partition(":")
    splits = [split] if split != "validation" else ["validation", "valid", "val", "test"]
    for s in splits:
        try:
            ds = datasets.load_dataset(name, config or None, split=s)
        except ValueError:
            continue  # no such split; try the next name
        except Exception as e:  # network, missing dataset, ... : one line naming the source
            raise DataError(f"{spec}: cannot load split {s!r} ({type(e).__name__}: {e})") from None
        if "text" not in ds.column_names:
            raise DataError(f"{spec}: dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
        for rec in ds:
            if rec["text"]:
                yield rec["text"]
        return
    raise DataError(f"{spec}: dataset has no {split!r} split")


# ---------------------------------------------------------------------------------------------------------------
# Token cache


def _source_key(split: Split, root: Path) -> dict:
    items = []
    for s in split.sources:
        items.append([s, split.hf_split] if s.startswith("hf:") else ["sha256", remembered_digest(s, root / "sources", DataError)])
    return {"format": CACHE_FORMAT, "tokenizer": tokenizer_hash(), "sources": items}


def _tokenize_to(split: Split, out_path: Path, progress: bool) -> tuple[int, int]:
    """Write the uint16 token stream of `split` (ignoring its `part`) to `out_path`; returns (tokens, documents)."""
    tok = get_tokenizer()
    if tok.get_vocab_size() > 65535:
        raise DataError(f"{TOKENIZER_FILE}: vocabulary of {tok.get_vocab_size()} does not fit uint16 tokens")
    n_tokens = n_docs = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tokenizing", unit=" docs", leave=False, dynamic_ncols=True)
    with open(out_path, "wb") as f:
        for src in split.sources:
            docs = _hf_documents(src, split.hf_split or "train") if src.startswith("hf:") else read_documents(src)
            src_tokens, batch = 0, []

            def flush():
                nonlocal n_tokens, n_docs, src_tokens
                for enc in tok.encode_batch(batch, add_special_tokens=False):
                    ids = np.asarray(enc.ids, dtype=np.uint16)
                    ids.tofile(f)
                    np.asarray([EOT_ID], dtype=np.uint16).tofile(f)
                    n_tokens += ids.size + 1
                    src_tokens += ids.size
                    n_docs += 1
                if bar is not None:
                    bar.update(len(batch))
                batch.clear()

            chars = 0
            for doc in docs:
                batch.append(doc)
                chars += len(doc)
                if chars > 4_000_000 or len(batch) >= 256:  # bounded memory, still parallel inside tokenizers
                    flush()
                    chars = 0
            if batch:
                flush()
            if src_tokens == 0:
                raise DataError(f"{src}: no text found")
    if bar is not None:
        bar.close()
    return n_tokens, n_docs


def _cached_stream(split: Split, cache_dir: str | os.PathLike | None, progress: bool,
                   verify: bool = True) -> tuple[np.ndarray, str]:
    """(the whole token stream of `split.sources` as a read-only uint16 memmap, its SHA-256), tokenizing on first
    use (and again when the cached entry no longer matches its recorded size and SHA-256)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create the token cache folder ({e.strerror})") from None
    key_obj = _source_key(split, root)
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()[:24]
    bin_path, meta_path = root / f"tokens-{key}.bin", root / f"tokens-{key}.json"
    if meta_path.is_file() and bin_path.is_file():
        why, sha = _stale(bin_path, meta_path, verify)
        if why is None:
            return np.memmap(bin_path, dtype=np.uint16, mode="r"), sha
        log.warning("memoryformer: token cache %s %s; tokenizing %s again", bin_path, why, ", ".join(split.sources))
    tmp_bin = root / f".tokens-{key}.{os.getpid()}.bin.tmp"
    try:
        n_tokens, n_docs = _tokenize_to(split, tmp_bin, progress)
        finish_file(tmp_bin)
        digest = sha256_file(tmp_bin)
        os.replace(tmp_bin, bin_path)
    finally:
        if tmp_bin.exists():
            tmp_bin.unlink()
    tmp_meta = root / f".tokens-{key}.{os.getpid()}.json.tmp"
    tmp_meta.write_text(json.dumps({**key_obj, "n_tokens": n_tokens, "n_docs": n_docs, "sha256": digest}, indent=1))
    finish_file(tmp_meta)
    os.replace(tmp_meta, meta_path)  # the metadata file marks the entry complete
    return np.memmap(bin_path, dtype=np.uint16, mode="r"), digest


def _stale(bin_path: Path, meta_path: Path, verify: bool) -> tuple[str | None, str]:
    """(why a cache entry cannot be used, or None if it can; its recorded SHA-256)."""
    try:
        meta = json.loads(meta_path.read_text())
        n, sha = meta["n_tokens"], meta["sha256"]
        if not (isinstance(n, int) and n > 0 and isinstance(sha, str)):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return "has an unreadable record", ""
    if bin_path.stat().st_size != 2 * n:
        return f"holds {bin_path.stat().st_size} bytes, not the {2 * n} recorded", sha
    if verify and not file_matches(bin_path, sha):
        return "does not match its recorded SHA-256 (damaged)", sha
    return None, sha


def _tail_start(stream: np.ndarray, fraction: float) -> int:
    """Index where the held-out tail starts: about `fraction` of the stream, moved to a document start."""
    n = len(stream)
    cut = n - max(1, int(round(n * fraction)))
    eots = np.flatnonzero(np.asarray(stream[cut:]) == EOT_ID)
    if len(eots) and cut + eots[0] + 1 < n - 1:
        return int(cut + eots[0] + 1)
    return cut


def load_tokens(data: str | None = None, split: str = "train", *, val_data: str | None = None,
                cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.01, progress: bool = False,
                verify: bool = True) -> np.ndarray:
    """Token ids (uint16, 1-D memmap) of one split ("train" or "val") of a data source; tokenizes on first use.
    `verify` checks the cached tokens against their recorded SHA-256 (rebuilding them when they differ)."""
    return token_split(data, split, val_data=val_data, cache_dir=cache_dir, val_fraction=val_fraction,
                       progress=progress, verify=verify)[0]


def token_split(data: str | None = None, split: str = "train", *, val_data: str | None = None,
                cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.01, progress: bool = False,
                verify: bool = True) -> tuple[np.ndarray, str]:
    """(`load_tokens(...)`, fingerprint): the fingerprint names the exact tokens (the SHA-256 of the cached stream
    and the slice taken), so a resumed run can tell that its data is what the checkpoint was trained on."""
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    s = plan_splits(data, val_data)[split]
    stream, sha = _cached_stream(s, cache_dir, progress, verify)
    lo, hi = 0, len(stream)
    if s.part != "all":
        cut = _tail_start(stream, val_fraction)
        lo, hi = (0, cut) if s.part == "head" else (cut, len(stream))
    return stream[lo:hi], f"{sha[:32]}[{lo}:{hi}]"


def text_tokens(source: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = False,
                verify: bool = True) -> np.ndarray:
    """The whole token stream of a source to score (every text file it names, whatever its split name; "sample":
    the bundled sample's validation books; hf:NAME: its validation split), tokenized once into the cache."""
    if source == SAMPLE:
        split = Split([str(SAMPLE_FILES["val"])])
    elif source.startswith("hf:"):
        split = Split([source], "validation")
    else:
        split = Split([str(f) for f in _expand(source)])
    return _cached_stream(split, cache_dir, progress, verify)[0]


def val_tokens(data: str | None = None, *, val_data: str | None = None, cache_dir=None, **kw) -> np.ndarray:
    """The validation token stream of a data source (the bundled sample's val books by default)."""
    return load_tokens(data, "val", val_data=val_data, cache_dir=cache_dir, **kw)


def describe(data: str | None, val_data: str | None = None) -> dict:
    """Which files feed each split (for logs and reports)."""
    plan = plan_splits(data, val_data)
    return {k: {"sources": v.sources, "part": v.part} for k, v in plan.items()}


# ---------------------------------------------------------------------------------------------------------------
# Batches


class WindowSampler:
    """Uniformly random window offsets from a seeded PCG64 generator; `state_dict()` is the exact data position."""

    def __init__(self, n_tokens: int, window: int, seed: int):
        if n_tokens < window:
            raise DataError(f"data: {n_tokens} tokens is shorter than one window of {window} (seq_len + 1)")
        self.n_tokens, self.window = n_tokens, window
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.draws = 0

    def next(self, count: int) -> np.ndarray:
        """(count,) int64 start offsets in [0, n_tokens - window]."""
        self.draws += 1
        return self.rng.integers(0, self.n_tokens - self.window + 1, size=count, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state, "draws": self.draws, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_tokens") != self.n_tokens:
            raise DataError(
                f"data: the checkpoint was trained on a stream of {state.get('n_tokens')} tokens, this data has "
                f"{self.n_tokens}; resume with the same --data"
            )
        self.rng.bit_generator.state = state["bit_generator"]
        self.draws = state["draws"]


def windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """(len(starts), length) int64 tensor of tokens[s : s + length] for each start."""
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts]))


def eval_starts(n_tokens: int, seq_len: int, max_tokens: int) -> np.ndarray:
    """Fixed start offsets of non-overlapping validation windows (seq_len + 1 tokens), spread over the stream.

    At most `max_tokens // seq_len` windows; consecutive when the stream is short, else evenly spaced so that the
    estimate covers every part (every book) of the validation text.
    """
    fit = (n_tokens - 1) // seq_len
    if fit < 1:
        raise DataError(f"validation data: {n_tokens} tokens is shorter than one window of {seq_len + 1}")
    n = max(1, min(fit, max_tokens // seq_len))
    if n == fit:
        return np.arange(n, dtype=np.int64) * seq_len
    return np.linspace(0, n_tokens - seq_len - 1, n).astype(np.int64)
