"""Checkpoints: a directory with `model.safetensors` and `config.json` (the resolved ModelConfig).

A training checkpoint (`OUT/ckpt-<step>/`, `OUT/final/`) adds everything needed to continue bit for bit, and no
pickles:
- `optimizer.safetensors`: optimizer tensors keyed `<parameter name>/<state key>` (AdamW moments and step);
- `rng.safetensors`: torch CPU (and CUDA) generator states;
- `trainer.json`: step, tokens, elapsed time, the data sampler's generator state, the optimizer's param groups and
  the resolved training config.
Directories are written under a temporary name and renamed into place, so a crash never leaves a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from memoryformer.config import MemoryFormerError, ModelConfig
from memoryformer.model import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
TRAINER = "trainer.json"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(MemoryFormerError):
    """A checkpoint directory is missing, incomplete or does not match what was asked for."""


# ---------------------------------------------------------------------------------------------------------------
# Model weights + config


INFERENCE_KEY = "memoryformer.inference_tables"  # safetensors metadata: "<table dtype>/<activation dtype>"


def _write_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": "pt", "library": "memoryformer", **(extra or {})}
    _replace_file(path / WEIGHTS, lambda tmp: save_file(state, tmp, metadata=meta))
    _replace_file(path / CONFIG, cfg.save)


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
    """Write `model.safetensors` + `config.json` into directory `path` (created if missing).

    A model whose tables `to_inference` froze (int8 with per-row scales, bfloat16, ...) is saved as it is, and
    `load_model` rebuilds it the same way.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bare = _unwrap(model)
    tag = _inference_tables(bare)
    _write_weights(bare.state_dict(), bare.config, path, {INFERENCE_KEY: tag} if tag else None)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a model saved by `save_model` (or a training checkpoint directory) onto `device`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise MemoryFormerError(f"{path}: not a checkpoint directory (expected {WEIGHTS} and {CONFIG} inside)")
    if not (path / WEIGHTS).is_file() and find_checkpoint(path, required=False) is not None:
        path = find_checkpoint(path)  # a training run's output folder: its newest checkpoint
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise MemoryFormerError(f"{path / name}: missing (a checkpoint holds {WEIGHTS} and {CONFIG})")
    cfg = ModelConfig.load(path / CONFIG)
    with torch.device("meta"):
        model = build_model(cfg)
    try:
        state = load_file(path / WEIGHTS, device=str(device))
        with safe_open(path / WEIGHTS, framework="pt") as f:
            tag = (f.metadata() or {}).get(INFERENCE_KEY)
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise MemoryFormerError(f"{path / WEIGHTS}: unreadable safetensors file ({e})") from None
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the file
    if tag:  # frozen inference tables: convert the fresh model the same way, then load into it
        _apply_inference_tag(model, tag, path / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MemoryFormerError(
            f"{path / WEIGHTS}: does not match {CONFIG} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _apply_inference_tag(model: torch.nn.Module, tag: str, file: Path) -> None:
    from memoryformer.config import INFERENCE_DTYPES
    from memoryformer.layers import MemoryLayer

    tables, _, act = tag.partition("/")
    act_dtype = getattr(torch, act, None)
    if tables not in INFERENCE_DTYPES or not isinstance(act_dtype, torch.dtype):
        raise MemoryFormerError(f"{file}: unknown {INFERENCE_KEY} {tag!r} (expected '<{'|'.join(INFERENCE_DTYPES)}>/<dtype>')")
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
# Training checkpoints


def is_checkpoint_name(name: str) -> bool:
    """`ckpt-<step>` or `final`: the folders a run writes its checkpoints to."""
    return name == "final" or _CKPT_RE.match(name) is not None


def write_text(dest: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (readers see the old or the new content, never a mix)."""
    _replace_file(Path(dest), lambda p: Path(p).write_text(text, encoding="utf-8"))


def _replace_file(dest: Path, write) -> None:
    """Call `write(tmp_path)` and rename the result onto `dest`, so readers never see a partial file."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike):
    """Yield a temporary sibling of `dest` to fill; on success it replaces `dest` in one rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    """Write a self-contained training checkpoint directory atomically; returns its path."""
    from safetensors.torch import save_file

    dest = Path(dest)
    opt_tensors, opt_rest = _flatten_optimizer(optimizer_state)
    with atomic_dir(dest) as tmp:
        _write_weights(model_state, model_config, tmp)
        save_file(opt_tensors, tmp / OPTIMIZER)
        save_file({k: v.contiguous().cpu() for k, v in rng_state.items()}, tmp / RNG)
        with open(tmp / TRAINER, "w", encoding="utf-8") as f:
            json.dump({**trainer_state, "optimizer": opt_rest}, f, indent=1)
            f.write("\n")
    return dest


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """{"path", "model_config", "model_state", "optimizer_state", "rng_state", "trainer_state"} of a checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for name in (WEIGHTS, CONFIG, OPTIMIZER, RNG, TRAINER):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (not a complete training checkpoint)")
    try:
        trainer = json.loads((path / TRAINER).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / TRAINER}: not valid JSON ({e})") from None
    tensors = {}
    for name in (WEIGHTS, OPTIMIZER, RNG):
        try:
            tensors[name] = load_file(path / name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / name}: unreadable safetensors file ({e})") from None
    opt_rest = trainer.pop("optimizer")
    return {
        "path": path,
        "model_config": ModelConfig.load(path / CONFIG),
        "model_state": tensors[WEIGHTS],
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
        if not p.is_dir() or not (_CKPT_RE.match(p.name) or p.name == "final") or not (p / TRAINER).is_file():
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


def prune_checkpoints(out: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` ckpt-<step>/ directories (final/ is never deleted)."""
    ckpts = [(s, p) for s, p in list_checkpoints(out) if p.name != "final"]
    for _, p in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
