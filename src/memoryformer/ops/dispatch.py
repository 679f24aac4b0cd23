"""One op for the weighted gather of Eq. 11, several kernels behind it.

`memory_lookup(codes, weights, tables, bias, backend=...)` runs the gather; `memory_layer(x, tables, bias, tau=...)`
hashes and gathers, which a backend may fuse. Backends register themselves with `register_backend` when their module
is imported (`memoryformer.ops` imports them all; Triton registers without importing triton):

* "reference": plain indexing (`reference.lookup_reference`), any dtype and device (float64 tests, meta tensors);
* "embedding_bag": `F.embedding_bag(mode="sum", per_sample_weights=...)` over the flattened (K*R, h) table;
* "cpu" (`ops/cpu.py`) and "triton" (`ops/triton_backend.py`): `torch.library` ops with their own kernels.

"auto" takes the highest-priority backend that accepts the tables and may be picked automatically (triton on CUDA,
cpu on CPU), and logs one line the first time a device's preferred fast path is unavailable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from memoryformer.config import DEFAULT_WEIGHTING, canonical_weighting
from memoryformer.ops.reference import chunk_hash, lookup_reference, row_scales

log = logging.getLogger("memoryformer")


@dataclass
class Backend:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (codes, weights, tables) -> (..., h)
    accepts: Callable[[torch.Tensor], bool]  # can it run on these tables (device, dtype)?
    priority: int  # higher wins under "auto"
    auto: Callable[[torch.Tensor], bool] | None = None  # may "auto" pick it? (default: whenever it accepts)
    why_not: Callable[[torch.Tensor], str | None] | None = None  # reason it cannot run, for the fallback notice
    layer_fn: Callable | None = None  # optional hash + lookup in one call (see `memory_layer`)
    layer_grad: bool = False  # does layer_fn support autograd (else it only runs when nothing needs a gradient)?


_BACKENDS: dict[str, Backend] = {}
_resolved: dict[tuple, Backend] = {}  # memoised choices of resolve_backend
# The backend "auto" should land on for each device type; anything else there is a fallback and gets one log line.
PREFERRED = {"cuda": "triton", "cpu": "cpu"}


def register_backend(name: str, fn, *, accepts=lambda t: True, priority: int = 0, auto=None, why_not=None,
                     layer_fn=None, layer_grad: bool = False) -> None:
    """Make `fn(codes, weights, tables) -> (..., h)` selectable as `backend=name` (and by "auto")."""
    _BACKENDS[name] = Backend(name, fn, accepts, priority, auto, why_not, layer_fn, layer_grad)
    _resolved.clear()


def lookup_embedding_bag(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Eq. 11 through `F.embedding_bag` (one bag of K rows per token, fp32 accumulation)."""
    K, R, h = tables.shape
    offsets = torch.arange(K, device=codes.device, dtype=codes.dtype) * R  # table k starts at row k*R
    idx = (codes + offsets).reshape(-1, K)  # (N, K)
    w = weights.reshape(-1, K).to(tables.dtype)
    out = F.embedding_bag(idx, tables.reshape(K * R, h), mode="sum", per_sample_weights=w)  # (N, h)
    return out.reshape(*codes.shape[:-1], h)


def _embedding_bag_accepts(tables: torch.Tensor) -> bool:
    # Meta tensors have no embedding_bag backward; bf16/fp16 weight gradients are missing on CUDA (torch <= 2.11).
    if tables.device.type == "meta" or not tables.is_floating_point():
        return False
    needs_grad = tables.requires_grad and torch.is_grad_enabled()
    return not (tables.device.type == "cuda" and tables.dtype != torch.float32 and needs_grad)


register_backend("reference", lookup_reference, priority=0)
register_backend("embedding_bag", lookup_embedding_bag, accepts=_embedding_bag_accepts, priority=10)


def backend_names() -> list[str]:
    return ["auto", *_BACKENDS]


_fallback_noted: set[tuple[str, str, str]] = set()


def _note_fallback(wanted: str, got: Backend, tables: torch.Tensor, reason: str | None) -> None:
    """One log line per (wanted, got, device) the first time a fast path is unavailable."""
    if torch.compiler.is_compiling():
        return
    key = (wanted, got.name, tables.device.type)
    if key in _fallback_noted:
        return
    _fallback_noted.add(key)
    what = f"{tables.device.type} {str(tables.dtype).removeprefix('torch.')} tables"
    log.warning("memoryformer: %r kernel unavailable for %s (%s) -> using %r", wanted, what, reason or "unsupported",
                got.name)


def resolve_backend(backend: str, tables: torch.Tensor) -> Backend:
    """The backend `memory_lookup` would run for these tables."""
    if torch.compiler.is_compiling():
        return _resolve(backend, tables)
    # Memoised on what the choice depends on (the environment, e.g. TRITON_INTERPRET, is read once): at batch 1 on
    # CPU a fresh search costs as much as the lookup.
    key = (backend, tables.device.type, tables.dtype, tables.requires_grad, torch.is_grad_enabled())
    b = _resolved.get(key)
    if b is None:
        b = _resolved[key] = _resolve(backend, tables)
    return b


def _resolve(backend: str, tables: torch.Tensor) -> Backend:
    if backend == "auto":
        best = None
        for b in _BACKENDS.values():  # a plain loop: torch.compile traces this without a graph break
            if not b.accepts(tables) or (b.auto is not None and not b.auto(tables)):
                continue
            if best is None or b.priority > best.priority:
                best = b
        wanted = _BACKENDS.get(PREFERRED.get(tables.device.type, ""))
        if wanted is not None and wanted is not best and not wanted.accepts(tables):
            _note_fallback(wanted.name, best, tables, wanted.why_not(tables) if wanted.why_not else None)
        return best
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {backend_names()}, got {backend!r}")
    b = _BACKENDS[backend]
    if not b.accepts(tables):
        fallback = _resolve("auto", tables)
        _note_fallback(backend, fallback, tables, b.why_not(tables) if b.why_not else None)
        return fallback
    return b


def memory_lookup(codes, weights, tables, bias=None, *, backend: str = "auto", scale=None) -> torch.Tensor:
    """Eq. 11: y = sum_k weights[..., k] * tables[k, codes[..., k]] (+ bias).

    codes (..., K) integer in [0, R); weights (..., K) floating; tables (K, R, h), floating or int8 with `scale`
    (K, R) (one fp32 dequantisation scale per row, see `ops.quant`); bias (h,) or None.
    Returns (..., h) in `reference.result_dtype(weights, tables)`.
    """
    return _lookup(resolve_backend(backend, tables), codes, weights, tables, bias, scale)


def _lookup(b: Backend, codes, weights, tables, bias, scale) -> torch.Tensor:
    if scale is not None:
        weights = weights * row_scales(scale, codes)
    y = b.fn(codes, weights, tables)
    return y if bias is None else y + bias


def memory_layer(x, tables, bias=None, *, tau: int, weighting: str = DEFAULT_WEIGHTING, temperature: float = 1.0,
                 backend: str = "auto", scale=None) -> torch.Tensor:
    """`memory_lookup(*chunk_hash(x, tau, ...), tables, bias)`; a backend may fuse both steps (Triton: one kernel
    computes the hash inside the gather; CPU: fewer calls for inference, which decides batch-1 latency)."""
    weighting = canonical_weighting(weighting)
    b = resolve_backend(backend, tables)
    if b.layer_fn is not None and (b.layer_grad or not (_needs_grad(x, tables, bias) or torch.compiler.is_compiling())):
        return b.layer_fn(x, tables, bias, tau=tau, weighting=weighting, temperature=temperature, scale=scale)
    codes, weights = chunk_hash(x, tau, weighting=weighting, temperature=temperature)
    return _lookup(b, codes, weights, tables, bias, scale)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
