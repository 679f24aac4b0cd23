"""Kernels behind the Memory Layer. Everything above this package calls `memory_lookup` and `chunk_hash` only."""

from memoryformer.ops.memory import (
    backend_names,
    chunk_hash,
    lookup_embedding_bag,
    lookup_reference,
    memory_lookup,
    register_backend,
    resolve_backend,
)

__all__ = [
    "backend_names",
    "chunk_hash",
    "lookup_embedding_bag",
    "lookup_reference",
    "memory_lookup",
    "register_backend",
    "resolve_backend",
]
