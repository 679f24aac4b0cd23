"""`save_model` and `load_model` (`memoryformer.save_model`, `memoryformer.load`): a model's weights and config.

A model frozen for inference (`memoryformer.freeze`) is saved as it is, with safetensors metadata saying what was
frozen (`memoryformer.inference.inference_metadata`); `load_model` rebuilds it through the one streaming loader
(`memoryformer.inference.load_for_inference`), which also freezes a trained checkpoint on the way in (`tables=`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from memoryformer.checkpoint.files import (
    CONFIG,
    WEIGHTS,
    _read_metadata,
    _read_weights,
    _unreadable,
    _verify,
    _write_errors,
    _write_weights,
    check_config,
)
from memoryformer.checkpoint.training import find_checkpoint
from memoryformer.config import HEAD_KEY, INFERENCE_DTYPES, TABLES_KEY, MemoryFormerError, ModelConfig
from memoryformer.integrity import ensure_dir, write_manifest
from memoryformer.model import build_model
from memoryformer.resources import check_fits


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write `model.safetensors` + `config.json` + `manifest.json` into directory `path` (created if missing).

    A model frozen by `memoryformer.freeze` (int8 tables / head / embedding with their row `scale`, bfloat16, ...)
    is saved as it is, and `load_model` rebuilds it the same way. A model with a NaN or inf in any tensor is
    refused.
    """
    from memoryformer.inference import inference_metadata

    path = ensure_dir(path, "out")
    bare = _unwrap(model)
    with _write_errors(path):
        _write_weights(bare.state_dict(), bare.config, path, inference_metadata(bare))
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



def _model_dir(path: Path) -> Path:
    """The folder holding the model files: `path`, or a run folder's newest checkpoint."""
    if not (path / WEIGHTS).is_file() and find_checkpoint(path, required=False) is not None:
        path = find_checkpoint(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise MemoryFormerError(f"{path / name}: missing (a checkpoint holds {WEIGHTS} and {CONFIG})")
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               *, verify: bool = True, tables: str | None = None, head: str | None = None):
    """Load a model saved by `save_model` (or a training checkpoint directory, or a run folder's newest checkpoint)
    onto `device`.

    `verify` (default) checks the files against `manifest.json` and every tensor for NaN/inf; `config.json` is
    always cross-checked against the tensors' shapes.

    `tables` ("int8", "int4", "bfloat16", "float16", "float32") loads for inference: the model is built tensor by
    tensor in that precision (never the fp32 model in memory; `memoryformer.inference.load_for_inference`), with the
    LM head and token embedding in `head` (default: int8 with int8 or int4 tables, bfloat16 with bfloat16, else
    float32), the tables on huge pages. A folder holding a frozen model (`memoryformer.freeze` + `save_model`) is
    always loaded that way, as it is. On the CPU, `generate` then decodes through the compiled engine (int4 rows:
    the eager model).
    """
    from memoryformer.inference import default_head, load_for_inference

    path = Path(path)
    if not path.is_dir():
        raise MemoryFormerError(f"{path}: not a checkpoint directory (expected {WEIGHTS} and {CONFIG} inside)")
    device = resolve_device(device)
    path = _model_dir(path)
    if tables is not None and tables not in INFERENCE_DTYPES:
        raise MemoryFormerError(f"tables: expected one of {INFERENCE_DTYPES}, got {tables!r}")
    if verify:  # before parsing anything: a truncated or damaged file is named as such
        _verify(path, (WEIGHTS, CONFIG))
    meta = _read_metadata(path)
    check_fits(load_bytes(path, tables, head), f"loading {path}", str(device))
    if tables is not None or head is not None or meta.get(HEAD_KEY) or meta.get(TABLES_KEY):
        head = head if head is not None else (default_head(tables) if tables is not None else None)
        try:
            model = load_for_inference(path, tables=tables, head=head, device="cpu")
        except ValueError as e:
            raise MemoryFormerError(str(e)) from None
    else:
        state, _ = _read_weights(path, verify, str(device), names=())  # the files were verified above
        cfg = ModelConfig.load(path / CONFIG)
        with torch.device("meta"):
            model = build_model(cfg)
        model.to_empty(device=device)
        model.init_weights()  # buffers (rotary tables) are not in the file
        check_config(cfg, state, model.state_dict(), path)
        model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


def load_bytes(path: Path, tables: str | None, head: str | None) -> float:
    """Peak bytes `load_model` will hold, from the file's header alone: the model in its target precisions, and
    for a plain load also the tensors read before they are copied in (twice the float32 model)."""
    from safetensors import safe_open

    with _unreadable(path), safe_open(path / WEIGHTS, framework="pt") as f:
        shapes = {k: (math.prod(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    if tables is None and head is None and not any(d == "I8" for _, d in shapes.values()):
        return 2 * 4 * sum(n for n, _ in shapes.values())

    def size(name: str, stored: str) -> float:
        want = tables if name.endswith(".tables") else head if name.split(".")[0] in ("head", "embed") else "float32"
        return _BYTES.get(want, {"I8": 1, "BF16": 2, "F16": 2}.get(stored, 4))

    return sum(n * size(k, d) for k, (n, d) in shapes.items())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model
