"""Kernels behind the Memory Layer; everything above this package calls these functions only.

- `reference`: the math of the paper's Eq. 3-12 in plain PyTorch, one function per equation (`chunk_hash`,
  `lookup_reference`, `lookup_grads`, ...): what every backend is tested against;
- `dispatch`: one op, several backends (`memory_lookup`, `memory_layer`, `memory_hash`, `pack_tables`,
  `register_backend`, `resolve_backend`);
- backends, each registering itself on import with its own hash: `cpu` (fbgemm embedding bag + a compiled decode
  kernel), `triton` (`triton_backend` registers, `triton_kernels` holds the kernels and imports triton on first
  use); `library` turns a kernel pair into `torch.library` ops;
- `quant`: int8 inference tables with one scale per row; `int4`: int4 rows with one fp16 scale per group.
To add a backend: write `fn(codes (..., K), weights (..., K), tables (K, R, h)) -> (..., h)` (ideally a
`torch.library` op via `library.define_lookup_op`), call `register_backend(name, fn, accepts=..., priority=...)` at
the bottom of its module (optionally `hash_fn=`, `layer_fn=`, `pack=`, `sparse_grad=`), and import the module below.
"""

from memoryformer.ops import cpu, triton_backend  # noqa: F401  (each registers its backend)
from memoryformer.ops.dispatch import (
    backend_names,
    lookup_embedding_bag,
    memory_hash,
    memory_layer,
    memory_lookup,
    pack_tables,
    register_backend,
    resolve_backend,
)
from memoryformer.ops.quant import dequantize_rows, quantize_rows
from memoryformer.ops.reference import chunk_hash, chunk_weights, lookup_reference, pack_bits, result_dtype
from memoryformer.ops.triton_backend import triton_installed

__all__ = [
    "backend_names",
    "chunk_hash",
    "chunk_weights",
    "dequantize_rows",
    "lookup_embedding_bag",
    "lookup_reference",
    "memory_hash",
    "memory_layer",
    "memory_lookup",
    "pack_bits",
    "pack_tables",
    "quantize_rows",
    "register_backend",
    "resolve_backend",
    "result_dtype",
    "triton_installed",
]
