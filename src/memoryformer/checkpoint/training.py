"""Training checkpoints (`OUT/ckpt-<step>/`, `OUT/final/`): the model files plus everything needed to continue
bit for bit, and no pickles:
- `optimizer.safetensors`: optimizer tensors keyed `<parameter name>/<state key>` (AdamW moments and step);
- `rng.safetensors`: torch CPU (and CUDA) generator states;
- `trainer.json`: step, tokens, elapsed time, the data sampler's generator state, the optimizer's param groups and
  the resolved training config.
Directories are written under a temporary name, fsynced and renamed into place (`atomic_dir`), so a crash never
leaves a partial one; a tensor holding NaN or inf is never written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from memoryformer.checkpoint.files import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    _read_weights,
    _write_errors,
    _write_weights,
    atomic_dir,
    check_config,
)
from memoryformer.config import MemoryFormerError, ModelConfig
from memoryformer.integrity import check_finite, write_manifest
from memoryformer.model import build_model

OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
TRAINER = "trainer.json"
TRAINING_FILES = (WEIGHTS, CONFIG, OPTIMIZER, RNG, TRAINER)
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
log = logging.getLogger("memoryformer")


def is_checkpoint_name(name: str) -> bool:
    """`ckpt-<step>` or `final`: the folders a run writes its checkpoints to."""
    return name == "final" or _CKPT_RE.match(name) is not None



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
