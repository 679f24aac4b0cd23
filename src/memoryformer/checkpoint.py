"""Model checkpoints: a directory with `model.safetensors` and `config.json` (the resolved ModelConfig)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from memoryformer.config import MemoryFormerError, ModelConfig
from memoryformer.model import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write `model.safetensors` + `config.json` into directory `path` (created if missing)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    save_file(state, path / WEIGHTS, metadata={"format": "pt", "library": "memoryformer"})
    _unwrap(model).config.save(path / CONFIG)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a model saved by `save_model` (or a training checkpoint directory) onto `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise MemoryFormerError(f"{path}: not a checkpoint directory (expected {WEIGHTS} and {CONFIG} inside)")
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise MemoryFormerError(f"{path / name}: missing (a checkpoint holds {WEIGHTS} and {CONFIG})")
    cfg = ModelConfig.load(path / CONFIG)
    with torch.device("meta"):
        model = build_model(cfg)
    try:
        state = load_file(path / WEIGHTS, device=str(device))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise MemoryFormerError(f"{path / WEIGHTS}: unreadable safetensors file ({e})") from None
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the file
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MemoryFormerError(
            f"{path / WEIGHTS}: does not match {CONFIG} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model
