"""Kernels behind the Memory Layer. Everything above this package calls `memory_lookup` and `chunk_hash` only.

Backends (`memory_lookup(..., backend=name)`, `MemoryLayer(..., backend=name)`):

* "reference": plain PyTorch indexing, any dtype and device (float64 for tests);
* "embedding_bag": `F.embedding_bag` with per-sample weights;
* "cpu": `torch.library` op for CPU tensors: fbgemm embedding-bag forward (fp32/bf16/fp16, and int8 tables through
  fbgemm's 8-bit row-wise kernel), deterministic backward; `layer_forward` fuses the hash in for inference;
* "triton": `torch.library.triton_op`s with fused Triton forward and backward kernels for CUDA tensors (CPU tensors
  too when TRITON_INTERPRET=1, for testing); through `memory_layer` the hash is computed inside the gather kernel.

"auto" takes triton on CUDA and cpu on CPU (training and inference), and logs one line the first time a device's
fast path is unavailable.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from memoryformer.ops import cpu
from memoryformer.ops.memory import (
    backend_names,
    chunk_hash,
    lookup_embedding_bag,
    lookup_reference,
    memory_layer,
    memory_lookup,
    register_backend,
    resolve_backend,
)
from memoryformer.ops.quant import dequantize_rows, quantize_rows


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looks on disk only; importing it is slow


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def _triton_why_not(tables: torch.Tensor) -> str | None:
    if not triton_installed():
        return "triton is not installed"
    if tables.device.type == "cuda":
        return None
    if tables.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1)"


def _triton_lookup(codes, weights, tables):
    from memoryformer.ops import triton_kernels  # imports triton: only when this backend runs

    return triton_kernels.lookup(codes, weights, tables)


def _triton_layer(x, tables, bias, **kw):
    from memoryformer.ops import triton_kernels

    return triton_kernels.layer_forward(x, tables, bias, **kw)


register_backend("cpu", cpu.lookup, accepts=cpu.accepts, priority=20, layer_fn=cpu.layer_forward)
register_backend(
    "triton",
    _triton_lookup,
    accepts=lambda t: _triton_why_not(t) is None,
    priority=30,
    auto=lambda t: t.device.type == "cuda",
    why_not=_triton_why_not,
    layer_fn=_triton_layer,
    layer_grad=True,
)

__all__ = [
    "backend_names",
    "chunk_hash",
    "dequantize_rows",
    "lookup_embedding_bag",
    "lookup_reference",
    "memory_layer",
    "memory_lookup",
    "quantize_rows",
    "register_backend",
    "resolve_backend",
    "triton_installed",
]
