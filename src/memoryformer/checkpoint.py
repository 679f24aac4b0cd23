"""Checkpoints: a directory with `model.safetensors`, `config.json` (the resolved ModelConfig) and `manifest.json`
(size and SHA-256 of each file, see `memoryformer.integrity`).

A training checkpoint (`OUT/ckpt-<step>/`, `OUT/final/`) adds everything needed to continue bit for bit, and no
pickles:
- `optimizer.safetensors`: optimizer tensors keyed `<parameter name>/<state key>` (AdamW moments and step);
- `rng.safetensors`: torch CPU (and CUDA) generator states;
- `trainer.json`: step, tokens, elapsed time, the data sampler's generator state, the optimizer's param groups and
  the resolved training config.
Directories are written under a temporary name, fsynced and renamed into place, so a crash never leaves a partial
one; a tensor holding NaN or inf is never written. Loading verifies the manifest, the tensors' finiteness and that
`config.json` agrees with the tensors' shapes (`verify=False` skips the first two).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from memoryformer.config import (
    CONFIG_FILE,
    HEAD_KEY,
    INFERENCE_DTYPES,
    TABLES_KEY,
    WEIGHTS_FILE,
    MemoryFormerError,
    ModelConfig,
)
from memoryformer.integrity import (
    check_finite,
    durable_replace,
    ensure_dir,
    finish_file,
    replace_file,
    verify_files,
    write_manifest,
)
from memoryformer.model import build_model

WEIGHTS, CONFIG = WEIGHTS_FILE, CONFIG_FILE
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
TRAINER = "trainer.json"
TRAINING_FILES = (WEIGHTS, CONFIG, OPTIMIZER, RNG, TRAINER)
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
log = logging.getLogger("memoryformer")


class CheckpointError(MemoryFormerError):
    """A checkpoint directory is missing, incomplete or does not match what was asked for."""


# ---------------------------------------------------------------------------------------------------------------
# Model weights + config


INFERENCE_KEY = TABLES_KEY  # safetensors metadata: "<table dtype>/<activation dtype>"
MANIFEST_KEY = "memoryformer.manifest"  # safetensors metadata: "1" when the folder's writer wrote a manifest


def _write_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    check_finite(state, f"{path / WEIGHTS}: not written")
    meta = {"format": "pt", "library": "memoryformer", MANIFEST_KEY: "1", **(extra or {})}
    replace_file(path / WEIGHTS, lambda tmp: save_file(state, tmp, metadata=meta))
    replace_file(path / CONFIG, cfg.save)


def _inference_tables(model: torch.nn.Module) -> str | None:
    """"int8/float32"-style tag when `to_inference` froze the model's tables, else None (trainable tables)."""
    from memoryformer.layers import MemoryLayer

    tags = {f"{_dtype_name(m.tables.dtype)}/{_dtype_name(m.activation_dtype)}"
            for m in model.modules() if isinstance(m, MemoryLayer) and m.activation_dtype is not None}
    if len(tags) > 1:
        raise MemoryFormerError(f"model: memory tables converted to several inference dtypes ({sorted(tags)}); "
                                "save_model expects one")
    return tags.pop() if tags else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write `model.safetensors` + `config.json` + `manifest.json` into directory `path` (created if missing).

    A model whose tables `to_inference` froze (int8 with per-row scales, bfloat16, ...) is saved as it is, and
    `load_model` rebuilds it the same way. A model with a NaN or inf in any tensor is refused.
    """
    from memoryformer.inference import quantized_parts

    path = ensure_dir(path, "out")
    bare = _unwrap(model)
    tag, head = _inference_tables(bare), quantized_parts(bare)
    extra = {**({INFERENCE_KEY: tag} if tag else {}), **({HEAD_KEY: head} if head else {})}
    with _write_errors(path):
        _write_weights(bare.state_dict(), bare.config, path, extra)
        write_manifest(path, [WEIGHTS, CONFIG])
    return path


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists here, else one line saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MemoryFormerError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MemoryFormerError(f"device: {str(device)!r} requested but no CUDA GPU is available (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MemoryFormerError(f"device: {dev} requested but only {torch.cuda.device_count()} CUDA device(s) "
                                    "are visible")
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise MemoryFormerError(f"device: {str(device)!r} is not available on this machine")
    return dev


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               *, verify: bool = True, tables: str | None = None, head: str | None = None):
    """Load a model saved by `save_model` (or a training checkpoint directory, or a run folder's newest checkpoint)
    onto `device`.

    `verify` (default) checks the files against `manifest.json` and every tensor for NaN/inf; `config.json` is
    always cross-checked against the tensors' shapes.

    `tables` ("int8", "bfloat16", "float16", "float32") loads for inference: the model is built tensor by tensor in
    that precision (never the fp32 model in memory; `memoryformer.inference.load_for_inference`), with the LM head
    and token embedding in `head` (default: int8 with int8 tables, bfloat16 with bfloat16, else float32). A folder
    whose head is already quantised (`to_inference` + `save_model`) is always loaded that way. On the CPU,
    `generate` then decodes through the compiled engine.
    """
    from memoryformer.inference import default_head, load_for_inference
    path = Path(path)
    if not path.is_dir():
        raise MemoryFormerError(f"{path}: not a checkpoint directory (expected {WEIGHTS} and {CONFIG} inside)")
    device = resolve_device(device)
    if not (path / WEIGHTS).is_file() and find_checkpoint(path, required=False) is not None:
        path = find_checkpoint(path)  # a training run's output folder: its newest checkpoint
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise MemoryFormerError(f"{path / name}: missing (a checkpoint holds {WEIGHTS} and {CONFIG})")
    if tables is not None and tables not in INFERENCE_DTYPES:
        raise MemoryFormerError(f"tables: expected one of {INFERENCE_DTYPES}, got {tables!r}")
    if verify:  # before parsing anything: a truncated or damaged file is named as such
        _verify(path, (WEIGHTS, CONFIG))
    if tables is not None or head is not None or _read_metadata(path).get(HEAD_KEY):
        head = head if head is not None else (default_head(tables) if tables is not None else None)
        try:
            model = load_for_inference(path, tables=tables, head=head, device="cpu")
        except ValueError as e:
            raise MemoryFormerError(str(e)) from None
        return model if device.type == "cpu" else model.to(device)
    state, meta = _read_weights(path, verify, str(device), names=())  # the files were verified above
    cfg = ModelConfig.load(path / CONFIG)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the file
    if meta.get(INFERENCE_KEY):  # frozen inference tables: convert the fresh model the same way, then load into it
        _apply_inference_tag(model, meta[INFERENCE_KEY], path / WEIGHTS)
    check_config(cfg, state, model.state_dict(), path)
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _read_weights(path: Path, verify: bool, device: str = "cpu", names=(WEIGHTS, CONFIG)) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of path/model.safetensors; with `verify`, the files `names` checked against
    the manifest and the tensors checked for NaN/inf."""
    from safetensors.torch import load_file

    if verify and names:  # before parsing anything: a truncated or damaged file is named as such
        _verify(path, names)
    with _unreadable(path):
        meta = _metadata(path)
        state = load_file(path / WEIGHTS, device=device)
    if verify:
        check_finite(state, str(path / WEIGHTS))
    return state, meta


@contextlib.contextmanager
def _unreadable(path: Path):
    """Reading path/model.safetensors fails with one line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable safetensors file ({e})") from None


def _verify(path: Path, names) -> None:
    """The files `names` of checkpoint folder `path` against its manifest (one that its writer wrote must exist)."""
    with _unreadable(path):
        verify_files(path, names, required=lambda: _metadata(path).get(MANIFEST_KEY) == "1")


def _read_metadata(path: Path) -> dict:
    with _unreadable(path):
        return _metadata(path)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path / WEIGHTS, framework="pt") as f:
        return f.metadata() or {}


def _apply_inference_tag(model: torch.nn.Module, tag: str, file: Path) -> None:
    from memoryformer.inference import parse_tables_tag
    from memoryformer.layers import MemoryLayer

    tables, act_dtype = parse_tables_tag(tag, file)
    for m in model.modules():
        if isinstance(m, MemoryLayer):
            m.to_inference(tables)
            m.activation_dtype = act_dtype


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


# ---------------------------------------------------------------------------------------------------------------
# config.json against the tensors


def infer_config_fields(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The ModelConfig fields that a state dict's tensor names and shapes determine."""
    out: dict = {}
    if len(shapes.get("embed.weight", ())) == 2:
        out["vocab_size"], out["d_model"] = shapes["embed.weight"]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        return out
    out["n_layer"] = max(blocks) + 1
    qkv = shapes.get("blocks.0.attn.qkv.tables")
    out["arch"] = "memoryformer" if qkv is not None else "transformer"
    if qkv is not None and len(qkv) == 3 and qkv[1] & (qkv[1] - 1) == 0:
        out["tau"] = qkv[1].bit_length() - 1
        l2 = shapes.get("blocks.0.mlp.l2.tables")
        if l2 is not None and len(l2) == 3:
            out["expand_bits"] = l2[1].bit_length() - 1 - out["tau"]
        out["memory_bias"] = "blocks.0.attn.qkv.bias" in shapes
        out["hash_projection"] = "blocks.0.attn.qkv.proj.weight" in shapes
    fc = shapes.get("blocks.0.mlp.fc.weight")
    if fc is not None and "d_model" in out and out["d_model"]:
        out["ffn_mult"] = fc[0] // out["d_model"]
    if "blocks.0.attn.core.E" in shapes:
        k, block = shapes["blocks.0.attn.core.E"]
        out.update(attention="linformer", linformer_k=k, max_seq_len=k * block)
    if "blocks.0.attn.core.proj" in shapes:
        out.update(attention="performer", performer_features=shapes["blocks.0.attn.core.proj"][0])
    return out


def check_config(cfg: ModelConfig, state: dict, expected: dict, path: Path) -> None:
    """`config.json` against the tensors read from `model.safetensors`: the first field they contradict, else the
    first tensor whose name or shape differs from what the config builds (`expected`: the built model's state)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, value in infer_config_fields(shapes).items():
        if getattr(cfg, name) != value:
            raise CheckpointError(f"{path / CONFIG}: {name}={getattr(cfg, name)!r} does not match {WEIGHTS}, whose "
                                  f"tensors give {name}={value!r}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS}: does not match {CONFIG} (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    for k, want in expected.items():
        if shapes[k] != tuple(want.shape):
            raise CheckpointError(f"{path / WEIGHTS}: tensor {k!r} has shape {shapes[k]}, but {CONFIG} builds "
                                  f"{tuple(want.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints


def is_checkpoint_name(name: str) -> bool:
    """`ckpt-<step>` or `final`: the folders a run writes its checkpoints to."""
    return name == "final" or _CKPT_RE.match(name) is not None


def write_text(dest: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically and durably (readers see the old or the new content, never a mix)."""
    replace_file(Path(dest), lambda p: Path(p).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike):
    """Yield a temporary sibling of `dest` to fill; on success its files are fsynced and it replaces `dest` in one
    rename."""
    dest = Path(dest)
    ensure_dir(dest.parent)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            finish_file(f)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            durable_replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            durable_replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _write_errors(dest: Path):
    """A full disk, a file-size limit or a read-only place, as one line naming the checkpoint."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        why = getattr(e, "strerror", None) or " ".join(str(e).split())
        raise CheckpointError(f"{dest}: cannot write the checkpoint ({why}); nothing was replaced") from None


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a (name-keyed) optimizer state dict into safetensors tensors and JSON-able rest."""
    tensors, scalars = {}, {}
    for name, st in osd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{name}/{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{name}/{key}"] = val
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, val in list(tensors.items()) + list(rest.get("scalars", {}).items()):
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = val
    return {"state": state, "param_groups": rest["param_groups"]}


def save_training_checkpoint(
    dest: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: ModelConfig,
    optimizer_state: dict,
    rng_state: dict[str, torch.Tensor],
    trainer_state: dict,
) -> Path:
    """Write a self-contained training checkpoint directory atomically; returns its path.

    Refused (nothing written, an IntegrityError naming the tensor) when a model or optimizer tensor is not finite;
    a failed write (full disk, file-size limit) is a CheckpointError and leaves the previous checkpoints as they were.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    opt_tensors, opt_rest = _flatten_optimizer(optimizer_state)
    check_finite(model_state, f"{dest}: not written: the model")
    check_finite(opt_tensors, f"{dest}: not written: the optimizer state")
    with _write_errors(dest), atomic_dir(dest) as tmp:
        _write_weights(model_state, model_config, tmp)
        save_file(opt_tensors, tmp / OPTIMIZER)
        save_file({k: v.contiguous().cpu() for k, v in rng_state.items()}, tmp / RNG)
        with open(tmp / TRAINER, "w", encoding="utf-8") as f:
            json.dump({**trainer_state, "optimizer": opt_rest}, f, indent=1)
            f.write("\n")
        write_manifest(tmp, list(TRAINING_FILES))
    return dest


def load_training_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """{"path", "model_config", "model_state", "optimizer_state", "rng_state", "trainer_state"} of a checkpoint.

    With `verify`: every file against the manifest, every tensor finite; the config always against the weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for name in TRAINING_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (not a complete training checkpoint)")
    state, _ = _read_weights(path, verify, names=TRAINING_FILES)
    try:
        trainer = json.loads((path / TRAINER).read_text(encoding="utf-8"))
        opt_rest = trainer.pop("optimizer")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path / TRAINER}: not a training state ({type(e).__name__}: {e})") from None
    tensors = {WEIGHTS: state}
    for name in (OPTIMIZER, RNG):
        try:
            tensors[name] = load_file(path / name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / name}: unreadable safetensors file ({e})") from None
    if verify:
        check_finite(tensors[OPTIMIZER], str(path / OPTIMIZER))
    cfg = ModelConfig.load(path / CONFIG)
    with torch.device("meta"):
        check_config(cfg, state, build_model(cfg).state_dict(), path)
    return {
        "path": path,
        "model_config": cfg,
        "model_state": state,
        "optimizer_state": _unflatten_optimizer(tensors[OPTIMIZER], opt_rest),
        "rng_state": tensors[RNG],
        "trainer_state": trainer,
    }


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete training checkpoints directly inside `out`, oldest first."""
    out = Path(out)
    found = []
    if not out.is_dir():
        return found
    for p in out.iterdir():
        if not p.is_dir() or not is_checkpoint_name(p.name) or not (p / TRAINER).is_file():
            continue
        try:
            step = int(json.loads((p / TRAINER).read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours or damaged: never resume from it
        found.append((step, p))
    # At equal steps prefer final/ (it also holds the end-of-run evaluation).
    return sorted(found, key=lambda sp: (sp[0], sp[1].name == "final"))


def find_checkpoint(path: str | os.PathLike, required: bool = True) -> Path | None:
    """The checkpoint to resume from: `path` itself if it is one, else the newest one inside it."""
    path = Path(path)
    if (path / TRAINER).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    if not required:
        return None
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder to resume from")
    raise CheckpointError(f"{path}: no training checkpoint (ckpt-<step>/ or final/ with {TRAINER}) to resume from")


def find_resumable(path: str | os.PathLike, *, verify: bool = True) -> Path:
    """The checkpoint to resume from, checked: `path` itself if it is one (an error if it does not load), else the
    newest checkpoint inside it that loads and verifies; each newer one skipped is logged with the reason."""
    path = Path(path)
    if (path / TRAINER).is_file():
        load_training_checkpoint(path, verify=verify)
        return path
    candidates = list_checkpoints(path)
    skipped = [p for p in (path.iterdir() if path.is_dir() else ()) if p.is_dir() and is_checkpoint_name(p.name)
               and p not in {c for _, c in candidates}]
    for p in skipped:
        log.warning("memoryformer: skipping %s: no readable %s", p, TRAINER)
    for _, ck in reversed(candidates):
        try:
            load_training_checkpoint(ck, verify=verify)
        except MemoryFormerError as e:
            log.warning("memoryformer: skipping %s: %s", ck, e)
            continue
        return ck
    if candidates or skipped:
        raise CheckpointError(f"{path}: none of its {len(candidates) + len(skipped)} checkpoint(s) loads intact "
                              "(see the lines above); nothing to resume from")
    return find_checkpoint(path)  # raises: no checkpoint at all


def prune_checkpoints(out: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` ckpt-<step>/ directories (final/ is never deleted)."""
    ckpts = [(s, p) for s, p in list_checkpoints(out) if p.name != "final"]
    for _, p in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(p, ignore_errors=True)

