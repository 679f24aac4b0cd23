"""Configuration: the model and training dataclasses, the presets, run-config files, and every shared constant.

Both dataclasses are validated on construction (errors name the field and what it accepts) and serialise to the
JSON written beside every checkpoint (`to_dict` / `from_dict`). This module imports nothing heavy (no torch), so the
command line can parse and check its input before loading anything else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path


class MemoryFormerError(Exception):
    """An error caused by what the user asked for (bad config, file, flag); the CLI prints it as one line."""


class ConfigError(MemoryFormerError, ValueError):
    """A configuration field holds a value outside what it accepts."""


# -- constants, each defined once ------------------------------------------------------------------------------------
ARCHS = ("memoryformer", "transformer")
WEIGHTINGS = ("release", "paper")  # ||z||_1 p(z) as in the authors' released code; p(z) of Eq. 10
DEFAULT_WEIGHTING = "paper"  # it trained better at equal tokens (benchmarks/results/weighting_evidence.md)
BIT_ORDERS = ("msb", "lsb")
BLOCK_ACTIVATIONS = (None, "gelu")
ATTENTIONS = ("softmax", "linformer", "cosformer", "performer")
BACKENDS = ("auto", "reference", "embedding_bag", "cpu", "triton")
# The one dtype vocabulary of the API and the command line. Each name is a torch attribute (getattr(torch, name));
# `memoryformer.ops.quant.torch_dtype` is the one place that resolves it.
# "int4" names packed four-bit rows (two per byte, one float16 scale per group of values: `memoryformer.ops.int4`).
DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
INFERENCE_DTYPES = DTYPES  # frozen tables (`freeze`, --tables); int8: one float32 scale per row
ROW_DTYPES = ("float32", "bfloat16", "int8", "int4")  # the LM head and the token embedding when frozen
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"  # a checkpoint folder's model files
TABLES_KEY = "memoryformer.inference_tables"  # safetensors metadata: "<table dtype>/<activation dtype>"
HEAD_KEY = "memoryformer.inference_head"  # "<head dtype>/<embedding dtype>" when head and embedding are quantised
PRECISIONS = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
TABLE_OPTIMS = ("adamw", "rowwise", "partial-rowwise-adam")  # memory-table optimizer rules (memoryformer.optim)
TABLE_DTYPES = ("float32", "bfloat16")  # memory-table storage while training
# model fields one architecture ignores: a resumed run is compared on the others only (a dense control saved when
# the default weighting was "release" resumes under any default)
MEMORY_ONLY_FIELDS = ("tau", "expand_bits", "weighting", "temperature", "block_activation", "memory_bias", "bit_order",
                      "hash_projection", "backend")
DENSE_ONLY_FIELDS = ("ffn_mult", "attention", "linformer_k", "performer_features")


class Fields:
    """Validation of one dataclass's fields: each check names the field, says what it accepts, and normalises
    what it accepts (YAML 1.1 reads 5e6 and 1e-3 as strings; 5e6 is an integer; paths become absolute)."""

    def __init__(self, obj):
        self.obj = obj

    def fail(self, name: str, msg: str):
        raise ConfigError(f"{name}: {msg} (got {getattr(self.obj, name)!r})")

    def integer(self, name: str, lo: int, hi: int | None = None, optional: bool = False, text: bool = True) -> None:
        v = getattr(self.obj, name)
        if v is None and optional:
            return
        if isinstance(v, str) and text:
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            self.fail(name, f"expected an integer {rng}" + (" or null" if optional else ""))
        setattr(self.obj, name, v)

    def number(self, name: str, lo: float, hi: float | None = None, optional: bool = False,
               open_lo: bool = False) -> None:
        v = getattr(self.obj, name)
        if v is None and optional:
            return
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                self.fail(name, "expected a number")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(name, "expected a finite number")
        v = float(v)
        if (v <= lo if open_lo else v < lo) or (hi is not None and v > hi):
            self.fail(name, f"expected a number in {'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}]")
        setattr(self.obj, name, v)

    def flag(self, name: str) -> None:
        if not isinstance(getattr(self.obj, name), bool):
            self.fail(name, "expected true or false")

    def one_of(self, name: str, choices: tuple, optional: bool = False) -> None:
        v = getattr(self.obj, name)
        if (v is None and optional) or (isinstance(v, (str, type(None))) and v in choices):
            return
        self.fail(name, f"expected one of {', '.join(map(repr, choices))}")

    def text(self, name: str, optional: bool = False, path: bool = False) -> None:
        v = getattr(self.obj, name)
        if v is None and optional:
            return
        if not isinstance(v, str) or not v:
            self.fail(name, "expected a non-empty string")
        if path:
            setattr(self.obj, name, os.path.abspath(os.path.expanduser(v)))


def dataclass_from_dict(cls, data, *, source: str, what: str):
    """`cls(**data)`, refusing anything but a mapping of `cls`'s fields with an error that names the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of {what} fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown {what} key {unknown[0]!r} (valid keys: {', '.join(sorted(known))})")
    return cls(**data)


def from_file(cls, data, source: str):
    """`cls.from_dict(data)` for data read from file `source`: every error names the file."""
    try:
        return cls.from_dict(data, source=source)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None


class _Serialisable:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config"):
        return dataclass_from_dict(cls, data, source=source, what=cls._what)

    def replace(self, **overrides):
        return type(self).from_dict({**self.to_dict(), **overrides}, source="override")


# -- the model -------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(_Serialisable):
    """Shape of a MemoryFormer or of its dense (Pythia / GPT-NeoX) control.

    `arch` picks the model class; the memory fields (`tau` ... `backend`) only apply to "memoryformer".
    """

    _what = "config"
    arch: str = "memoryformer"
    vocab_size: int = 50304
    n_layer: int = 6
    d_model: int = 512
    n_head: int = 8
    max_seq_len: int = 2048
    tau: int = 8  # bits per hash chunk; K = d_model // tau tables per Memory Layer
    expand_bits: int = 2  # Memory Block: layer 2 hashes tau + expand_bits bits (paper §2.4)
    weighting: str = DEFAULT_WEIGHTING  # "paper": p(z) (Eq. 10); "release": ||z||_1 * p(z) (authors' code)
    temperature: float = 1.0  # t in Eq. 10
    block_activation: str | None = None  # None (paper) or "gelu" between the two Memory Block layers (Table 6)
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embeddings
    rotary_base: float = 10000.0
    ffn_mult: int = 4  # dense control only: FFN width = ffn_mult * d_model
    memory_bias: bool = True  # learned bias on every Memory Layer (as in the authors' code)
    bit_order: str = "msb"  # "msb": chunk element j is bit tau-1-j (Fig. 2, authors' code); "lsb": bit j (Eq. 4)
    hash_projection: bool = False  # hash a learned Linear(in, in) of each Memory Layer's input (off in the paper)
    backend: str = "auto"  # Memory Layer kernel: auto (triton on CUDA, cpu on CPU), cpu, triton, embedding_bag, reference
    attention: str = "softmax"  # dense control only: "linformer" | "cosformer" | "performer" (Table 2 baselines)
    linformer_k: int = 64  # Linformer: compressed key/value rows per max_seq_len window (blocks of max_seq_len / k)
    performer_features: int = 128  # Performer: random features per head

    def __post_init__(self):
        f = Fields(self)
        f.one_of("arch", ARCHS)
        for name, lo, hi in (("vocab_size", 2, None), ("n_layer", 1, None), ("d_model", 1, None), ("n_head", 1, None),
                             ("max_seq_len", 1, None), ("tau", 1, 16), ("expand_bits", 0, 4), ("ffn_mult", 1, None),
                             ("linformer_k", 1, None), ("performer_features", 1, None)):
            f.integer(name, lo, hi, text=False)
        f.one_of("weighting", WEIGHTINGS)
        f.number("temperature", 0.0, open_lo=True)
        f.one_of("bit_order", BIT_ORDERS)
        f.one_of("block_activation", BLOCK_ACTIVATIONS)
        f.number("rotary_pct", 0.0, 1.0)
        f.number("rotary_base", 0.0, open_lo=True)
        for name in ("memory_bias", "hash_projection"):
            f.flag(name)
        f.one_of("backend", BACKENDS)
        f.one_of("attention", ATTENTIONS)
        if self.attention != "softmax" and self.arch != "transformer":
            f.fail("attention", "only the dense control (arch='transformer') takes an efficient attention")
        if self.attention == "linformer" and self.max_seq_len % self.linformer_k:
            f.fail("linformer_k", f"expected a divisor of max_seq_len={self.max_seq_len} (blocks of max_seq_len / k)")
        if self.d_model % self.n_head:
            f.fail("n_head", f"expected a divisor of d_model={self.d_model}")
        if self.arch == "memoryformer":
            if self.d_model % self.tau:
                f.fail("tau", f"expected a divisor of d_model={self.d_model} (d_model = tau * K)")
            if self.tau + self.expand_bits > 16:
                f.fail("expand_bits", f"tau + expand_bits must be <= 16 (tau={self.tau})")

    def fields_that_apply(self) -> dict:
        """`to_dict()` without the fields this architecture ignores (MEMORY_ONLY_FIELDS / DENSE_ONLY_FIELDS)."""
        ignored = DENSE_ONLY_FIELDS if self.arch == "memoryformer" else MEMORY_ONLY_FIELDS
        return {k: v for k, v in self.to_dict().items() if k not in ignored}

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_tables(self) -> int:
        """K: tables per Memory Layer (chunks of tau dims in the d_model-wide input)."""
        return self.d_model // self.tau

    @property
    def block_hidden(self) -> int:
        """Width between the two Memory Block layers: (tau + expand_bits) * K."""
        return (self.tau + self.expand_bits) * self.n_tables

    @property
    def rotary_dims(self) -> int:
        """Dims per head that are rotated (rounded down to an even number)."""
        return int(self.head_dim * self.rotary_pct) // 2 * 2

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        return from_file(cls, read_json(path, "config file"), str(path))


def read_json(path: str | os.PathLike, what: str = "file"):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MemoryFormerError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise MemoryFormerError(f"{path}: is a folder, expected a {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemoryFormerError(f"{path}: not valid JSON ({e})") from None


# Presets. The paper's scales (Table 1) and their Pythia controls; `micro` trains on two CPU cores in minutes.
_PRESETS: dict[str, dict] = {
    "micro": dict(arch="memoryformer", n_layer=4, d_model=128, n_head=4, max_seq_len=256, tau=8),
    "micro-dense": dict(arch="transformer", n_layer=4, d_model=128, n_head=4, max_seq_len=256),
    "tiny": dict(arch="memoryformer", n_layer=6, d_model=512, n_head=8, tau=8),
    "small": dict(arch="memoryformer", n_layer=12, d_model=768, n_head=12, tau=8),
    "base": dict(arch="memoryformer", n_layer=24, d_model=1024, n_head=16, tau=8),
    "pythia-70m": dict(arch="transformer", n_layer=6, d_model=512, n_head=8),
    "pythia-160m": dict(arch="transformer", n_layer=12, d_model=768, n_head=12),
    "pythia-410m": dict(arch="transformer", n_layer=24, d_model=1024, n_head=16),
}
# The dense control each MemoryFormer preset is compared with (same layers, width, heads).
DENSE_CONTROL = {"micro": "micro-dense", "tiny": "pythia-70m", "small": "pythia-160m", "base": "pythia-410m"}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name ("micro", "tiny", "small", "base", "micro-dense", "pythia-70m", ...), with overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (valid: {', '.join(_PRESETS)})")
    return ModelConfig.from_dict({**_PRESETS[name], **overrides}, source=f"preset {name!r}")


# -- training --------------------------------------------------------------------------------------------------------

SAMPLE = "sample"  # the data name that selects the bundled Gutenberg sample


@dataclass
class TrainConfig(_Serialisable):
    """The training knobs (the recipe of paper §3 by default; see memoryformer.train)."""

    _what = "training"
    data: str | None = None  # None or "sample": the bundled Gutenberg sample; else a file, folder, glob or hf:NAME
    val_data: str | None = None  # validation source; None: the data's val files, or its held-out tail
    out: str = "runs/train"  # run folder: metrics.jsonl, ckpt-<step>/, final/
    batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int | None = None  # sequences per forward per rank; None: fit the device's default
    seq_len: int | None = None  # tokens per training sequence; None: the model's max_seq_len
    lr: float | None = None  # peak LR; None: the recipe's default for the model
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak
    warmup_frac: float = 0.01  # linear warmup, as a fraction of all steps
    weight_decay: float = 0.1
    exclude_tables_from_wd: bool = False  # True: no weight decay on the memory tables
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    table_optim: str = "adamw"  # memory tables: "adamw" (the recipe), "rowwise", "partial-rowwise-adam" (optim.py)
    table_dtype: str = "float32"  # memory-table storage: "float32" or "bfloat16" (updates stochastically rounded)
    max_steps: int | None = None  # the run's length in optimizer steps (sets the LR schedule) ...
    max_tokens: int | None = None  # ... or in training tokens ...
    time_budget: float | None = None  # ... or in seconds (also a hard stop for the other two); this run only
    stop_after: int | None = None  # end this invocation after this step (checkpoint saved; resume continues)
    eval_every: int = 200  # steps between validations (and at the end); 0: only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation (fixed windows spread over the val text)
    log_every: int = 10  # steps between metrics.jsonl lines
    ckpt_every: int = 1000  # steps between ckpt-<step>/ checkpoints; 0: only final/
    keep_checkpoints: int | None = None  # keep only the newest N ckpt-<step>/; None: keep all
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms: bit-identical reruns and resumes on CPU
    device: str = "auto"  # "auto" (CUDA if present), "cpu" or "cuda"
    precision: str = "auto"  # "auto": bfloat16 autocast on CUDA, float32 on CPU; or either
    fsdp: bool = False  # FSDP2 (fully_shard per block, memory layers in their own unit) instead of DDP
    tensorboard: bool = False  # also log to OUT/tensorboard (needs the tensorboard package)
    progress: bool = True  # tqdm progress bar on rank 0
    verbose: bool = True  # print the run header and evaluations on rank 0
    cache_dir: str | None = None  # token cache; None: $MEMORYFORMER_CACHE or ~/.cache/memoryformer
    val_fraction: float = 0.01  # held-out tail when the data has no validation files
    max_skipped_steps: int = 5  # stop after this many consecutive steps with a non-finite loss or gradient norm
    verify: bool = True  # check checkpoints and the token cache against their SHA-256 when resuming
    force_memory: bool = False  # start even when the estimated training memory exceeds what is available

    def __post_init__(self):
        f = Fields(self)
        for name in ("data", "val_data"):
            f.text(name, optional=True, path=getattr(self, name) not in (None, SAMPLE)
                  and not str(getattr(self, name)).startswith("hf:"))
        f.text("cache_dir", optional=True, path=True)  # absolute: a run resumes from any working directory
        f.text("out")
        for name, lo, opt in (("batch_size", 1, False), ("micro_batch_size", 1, True), ("seq_len", 1, True),
                              ("max_steps", 1, True), ("max_tokens", 1, True), ("stop_after", 1, True),
                              ("eval_every", 0, False), ("eval_tokens", 1, False), ("log_every", 1, False),
                              ("ckpt_every", 0, False), ("keep_checkpoints", 1, True), ("seed", 0, False),
                              ("max_skipped_steps", 1, False)):
            f.integer(name, lo, optional=opt)
        f.number("lr", 0.0, optional=True, open_lo=True)
        for name, lo, hi in (("min_lr_ratio", 0.0, 1.0), ("warmup_frac", 0.0, 1.0), ("weight_decay", 0.0, None),
                             ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0), ("eps", 0.0, None), ("grad_clip", 0.0, None)):
            f.number(name, lo, hi)
        f.number("time_budget", 0.0, optional=True, open_lo=True)
        f.number("val_fraction", 0.0, 0.5, open_lo=True)
        for name in ("exclude_tables_from_wd", "deterministic", "fsdp", "tensorboard", "progress", "verbose", "verify",
                     "force_memory"):
            f.flag(name)
        f.one_of("device", DEVICES)
        f.one_of("precision", PRECISIONS)
        f.one_of("table_optim", TABLE_OPTIMS)
        f.one_of("table_dtype", TABLE_DTYPES)


# -- run-config files (the CLI's --config) ---------------------------------------------------------------------------


def load_run_config(spec: str, model_overrides: dict | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, training-field overrides) from a preset name or a YAML/JSON file.

    A file holds `preset: <name>` (optional), model fields (overriding the preset) and an optional `train:` mapping
    of TrainConfig fields. `model_overrides` (e.g. from the command line) win over the file.
    """
    model_overrides = model_overrides or {}
    if spec in preset_names():
        return get_config(spec, **model_overrides), {}
    path = Path(spec)
    if not path.is_file():
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            raise ConfigError(f"{spec}: config file not found")
        raise ConfigError(f"config: {spec!r} is neither a preset ({', '.join(preset_names())}) nor a YAML/JSON file")
    doc = _parse_file(path)
    preset = doc.pop("preset", None)
    train_over = doc.pop("train", None) or {}
    if not isinstance(train_over, dict):
        raise ConfigError(f"{spec}: key 'train': expected a mapping of training fields")
    from_file(TrainConfig, {**TrainConfig().to_dict(), **train_over}, f"{spec} (train)")
    if preset is not None and preset not in preset_names():
        raise ConfigError(f"{spec}: key 'preset': unknown preset {preset!r} (valid: {', '.join(preset_names())})")
    if preset is None and not doc:
        raise ConfigError(f"{spec}: names no preset and no model field (expected 'preset: <name>' or fields such "
                          "as d_model)")
    base = get_config(preset).to_dict() if preset is not None else ModelConfig().to_dict()
    return from_file(ModelConfig, {**base, **doc, **model_overrides}, spec), train_over


def _parse_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: report the parser's position
        raise ConfigError(f"{path}: cannot parse ({' '.join(str(e).split())})") from None
    if doc is None:
        raise ConfigError(f"{path}: the file is empty (expected 'preset: <name>' and/or model fields)")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    return dict(doc)
