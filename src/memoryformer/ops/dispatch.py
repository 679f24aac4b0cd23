"""One op for the weighted gather of Eq. 11, several kernels behind it.

`memory_lookup(codes, weights, tables, bias, backend=...)` runs the gather; `memory_layer(x, tables, bias, tau=...)`
hashes and gathers, which a backend may fuse. Backends register themselves with `register_backend` when their module
is imported (`memoryformer.ops` imports them all; Triton registers without importing triton):

* "reference": plain indexing (`reference.lookup_reference`), any dtype and device (float64 tests, meta tensors);
* "embedding_bag": `F.embedding_bag(mode="sum", per_sample_weights=...)` over the flattened (K*R, h) table;
* "cpu" (`ops/cpu.py`) and "triton" (`ops/triton_backend.py`): `torch.library` ops with their own kernels.

"auto" takes the highest-priority backend that accepts the tables and may be picked automatically (triton on CUDA,
cpu on CPU), and logs one line the first time a device's preferred fast path is unavailable.

Each backend has its own hash (`hash_fn`, default: `reference.chunk_hash`): the same codes as the reference, the
same weights up to rounding. Everything a kernel varies by comes in as an argument: `sparse_grad` (table gradients
as sparse COO tensors of the rows hit, where the backend offers them; dense elsewhere) and `packed` (frozen int8
tables in the layout the backend's kernel reads, made once by `pack_tables`).

Frozen int4 tables (packed uint8 with group-wise scales, `ops.int4`) are a storage format, not a kernel: the lookup
of every backend gathers their packed rows and dequantises them (`int4.int4_lookup`); the backend gives the hash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from memoryformer.config import DEFAULT_WEIGHTING
from memoryformer.ops.int4 import int4_lookup, is_int4
from memoryformer.ops.reference import chunk_hash, lookup_reference, row_scales

HashFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (x, tau, *, weighting, temperature) -> (codes, weights)

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
    hash_fn: HashFn = chunk_hash  # the backend's Eq. 3-10
    pack: Callable[[torch.Tensor], torch.Tensor | None] | None = None  # frozen tables -> layout layer_fn reads
    sparse_grad: bool = False  # does fn take sparse_grad=True (sparse COO table gradients of the rows hit)?


_BACKENDS: dict[str, Backend] = {}
_resolved: dict[tuple, Backend] = {}  # memoised choices of resolve_backend
# The backend "auto" should land on for each device type; anything else there is a fallback and gets one log line.
PREFERRED = {"cuda": "triton", "cpu": "cpu"}


def register_backend(name: str, fn, *, accepts=lambda t: True, priority: int = 0, auto=None, why_not=None,
                     layer_fn=None, layer_grad: bool = False, hash_fn: HashFn = chunk_hash, pack=None,
                     sparse_grad: bool = False) -> None:
    """Make `fn(codes, weights, tables) -> (..., h)` selectable as `backend=name` (and by "auto")."""
    _BACKENDS[name] = Backend(name, fn, accepts, priority, auto, why_not, layer_fn, layer_grad, hash_fn, pack,
                              sparse_grad)
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


def memory_lookup(codes, weights, tables, bias=None, *, backend: str = "auto", scale=None,
                  sparse_grad: bool = False) -> torch.Tensor:
    """Eq. 11: y = sum_k weights[..., k] * tables[k, codes[..., k]] (+ bias).

    codes (..., K) integer in [0, R); weights (..., K) floating; tables (K, R, h), floating or int8 with `scale`
    (K, R) (one fp32 dequantisation scale per row, see `ops.quant`), or int4 (K, R, h / 2) uint8 with `scale`
    (K, R, groups) (`ops.int4`); bias (h,) or None.
    sparse_grad: the tables' gradient as a sparse COO tensor of the rows hit (backends with `sparse_grad`, "cpu";
    the others give the dense gradient; `memoryformer.optim.RowwiseAdam` reads either).
    Returns (..., h) in `reference.result_dtype(weights, tables)`.
    """
    return _lookup(resolve_backend(backend, tables), codes, weights, tables, bias, scale, sparse_grad)


def _lookup(b: Backend, codes, weights, tables, bias, scale, sparse_grad: bool) -> torch.Tensor:
    if is_int4(tables):
        if scale is None:
            raise ValueError("tables: int4 tables need their group scales (scale=)")
        y = int4_lookup(codes, weights, tables, scale)
        return y if bias is None else y + bias
    if scale is not None:
        weights = weights * row_scales(scale, codes)
    y = b.fn(codes, weights, tables, sparse_grad=True) if sparse_grad and b.sparse_grad else b.fn(codes, weights, tables)
    return y if bias is None else y + bias


def memory_hash(x, tables, *, tau: int, weighting: str = DEFAULT_WEIGHTING, temperature: float = 1.0,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and weights of x's chunks (`reference.chunk_hash`) as the backend that runs for `tables` computes them."""
    b = resolve_backend(backend, tables)
    return b.hash_fn(x, tau, weighting=weighting, temperature=temperature)


def pack_tables(tables, *, backend: str = "auto") -> torch.Tensor | None:
    """Frozen tables in the layout the backend's fused layer reads (fbgemm's 8-bit rows for int8 tables on CPU), for
    the caller to keep and pass to `memory_layer(..., packed=)`; None when the backend needs none."""
    b = resolve_backend(backend, tables)
    return None if b.pack is None else b.pack(tables)


def memory_layer(x, tables, bias=None, *, tau: int, weighting: str = DEFAULT_WEIGHTING, temperature: float = 1.0,
                 backend: str = "auto", scale=None, sparse_grad: bool = False, packed=None) -> torch.Tensor:
    """`memory_lookup(*memory_hash(x, tables, tau, ...), tables, bias)`; a backend may fuse both steps (Triton: one
    kernel computes the hash inside the gather; CPU: fewer calls for inference, which decides batch-1 latency).
    packed: `pack_tables(tables)` of frozen tables, or None (then computed per call where a backend needs it)."""
    b = resolve_backend(backend, tables)
    with_grad = b.layer_grad and not (sparse_grad and b.sparse_grad)  # layer_fn gives no sparse table gradients
    if b.layer_fn is not None and not is_int4(tables) and (with_grad or not (_needs_grad(x, tables, bias) or torch.compiler.is_compiling())):
        kw = {} if packed is None else {"packed": packed}
        return b.layer_fn(x, tables, bias, tau=tau, weighting=weighting, temperature=temperature, scale=scale, **kw)
    codes, weights = b.hash_fn(x, tau, weighting=weighting, temperature=temperature)
    return _lookup(b, codes, weights, tables, bias, scale, sparse_grad)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
