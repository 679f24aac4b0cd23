"""Registers the "triton" backend without importing triton (slow to import, absent on many CPU machines): the
kernels in `triton_kernels.py` load on first use. It runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (the interpreter the tests use)."""

from __future__ import annotations

import importlib.util
import os

from memoryformer.ops.dispatch import register_backend

_INSTALLED = importlib.util.find_spec("triton") is not None  # looks on disk only


def triton_installed() -> bool:
    return _INSTALLED


def why_not(tables) -> str | None:
    if not _INSTALLED:
        return "triton is not installed"
    if tables.device.type == "cuda":
        return None
    if tables.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1)"


def _lookup(codes, weights, tables):
    from memoryformer.ops import triton_kernels

    return triton_kernels.lookup(codes, weights, tables)


def _layer(x, tables, bias, **kw):
    from memoryformer.ops import triton_kernels

    return triton_kernels.layer_forward(x, tables, bias, **kw)


register_backend("triton", _lookup, accepts=lambda t: why_not(t) is None, priority=30,
                 auto=lambda t: t.device.type == "cuda", why_not=why_not, layer_fn=_layer, layer_grad=True)
