"""The Memory Layer op (MemoryFormer, Ding et al., NeurIPS 2024, §2.2–2.3).

A Memory Layer cuts its input x (..., K*tau) into K chunks z_k of tau dims, hashes each chunk by its sign pattern to
one of 2**tau rows of table T_k, and returns y = sum_k w(z_k) * T_k[h(z_k)] (+ bias).

Three pieces live here:
* `chunk_hash(x, tau)` -> (codes, weights): Eq. 3-10. Codes are integers (no gradient); weights are differentiable.
* `memory_lookup(codes, weights, tables, bias, backend=...)`: the weighted gather of Eq. 11, with several backends
  behind one call. "reference" is plain PyTorch indexing (any dtype, float64 for tests); "embedding_bag" uses
  `F.embedding_bag(mode="sum", per_sample_weights=...)`. The fast kernels ("cpu", "triton") live in their own
  modules and register themselves with `register_backend`; "auto" picks the best one for the tensors.
* `memory_layer(x, tables, bias, tau=...)`: both steps, which a backend may fuse for inference.

Inference tables may be int8 with one scale per row: the scale folds into the weights (`memory_lookup(scale=)`).

Gradients (Eq. 12): dL/dT_k[i] = w_k * dL/dy for the row hit, zero elsewhere; dL/dw_k = <dL/dy, T_k[code_k]>, which
reaches x through dw/dz only (the code is a constant).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("memoryformer")

WEIGHTINGS = ("code", "paper")


_BYTE_GATHER = 0x8040201008040201 - (1 << 64)  # as int64: bit 63-9j for j = 0..7


def pack_bits(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., tau) bool -> (...,) int64 codes, bit j weighted 2**(tau-1-j) (MSB first).

    tau = 8 (the paper's choice): the 8 bools of a chunk are one little-endian int64 whose byte j is bit j; one
    multiply by 0x8040201008040201 moves bit j to bit 63-j without carries, so the code is the top byte. Other tau:
    float arithmetic, exact here (sums of distinct powers of two < 2**16), a GEMV for large inputs. Both are several
    times faster on CPU than an int64 multiply-and-reduce over the last dim.
    """
    tau = bits.shape[-1]
    if tau == 8 and bits.is_contiguous():
        v = bits.view(torch.int64).squeeze(-1)
        return ((v * _BYTE_GATHER) >> 56) & 255
    place = 2.0 ** torch.arange(tau - 1, -1, -1, device=bits.device, dtype=dtype)  # (tau,)
    b = bits.to(dtype)
    if b.numel() <= 1 << 17:
        return (b * place).sum(-1).to(torch.int64)
    return (b.reshape(-1, tau) @ place).reshape(b.shape[:-1]).to(torch.int64)


def chunk_hash(x: torch.Tensor, tau: int, *, weighting: str = "code", temperature: float = 1.0):
    """Hash the K = x.shape[-1] // tau chunks of x.

    Args:
        x: (..., K*tau) floating tensor (already normalised by the caller).
        tau: bits per chunk.
        weighting: "code" -> ||z||_1 * p(z) (the authors' released code); "paper" -> p(z) (Eq. 10).
        temperature: t in Eq. 10.

    Returns:
        codes: (..., K) int64 in [0, 2**tau), MSB-first: bit j of chunk z is [z_j >= 0] with weight 2**(tau-1-j)
            (Fig. 2 of the paper; Eq. 3 puts sign(0) = +1).
        weights: (..., K), float32 for half inputs, else x's dtype.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    z = x.unflatten(-1, (-1, tau))  # (..., K, tau)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()  # weights are products of tau sigmoids: keep them in fp32
    codes = pack_bits(z >= 0, z.dtype)  # (..., K)  Eq. 3-4 with Fig. 2's bit order
    a = z.abs()  # <z, sign(z)>, Eq. 8
    # Eq. 10: p(z) = prod_j sigmoid(2|z_j|/t) = 1 / prod_j (1 + exp(-2|z_j|/t)); summed in log space for stability
    weights = F.logsigmoid(a * (2.0 / temperature)).sum(-1).exp()  # (..., K)
    if weighting == "code":
        weights = a.sum(-1) * weights  # ||z||_1 * p(z): what the released code computes
    return codes, weights


def lookup_reference(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Plain indexing: y[..., :] = sum_k weights[..., k] * tables[k, codes[..., k], :]. Any dtype; O(N*K*h) memory."""
    K = tables.shape[0]
    rows = tables[torch.arange(K, device=codes.device), codes]  # (..., K, h)
    rows = rows.to(output_dtype(weights, tables))
    return torch.einsum("...k,...kh->...h", weights.to(rows.dtype), rows)


def lookup_embedding_bag(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The same sum through `F.embedding_bag` (one bag of K rows per token, fp32 accumulation)."""
    K, R, h = tables.shape
    lead = codes.shape[:-1]
    offsets = torch.arange(K, device=codes.device, dtype=codes.dtype) * R  # table k starts at row k*R
    idx = (codes + offsets).reshape(-1, K)  # (N, K)
    w = weights.reshape(-1, K).to(tables.dtype)
    out = F.embedding_bag(idx, tables.reshape(K * R, h), mode="sum", per_sample_weights=w)  # (N, h)
    return out.reshape(*lead, h)


def output_dtype(weights: torch.Tensor, tables: torch.Tensor) -> torch.dtype:
    """Float tables give outputs in their own dtype; int8 tables (already scaled into the weights) in the weights'."""
    return tables.dtype if tables.is_floating_point() else weights.dtype


# ---------------------------------------------------------------------------------------------------------------
# Backends. Each is `fn(codes, weights, tables) -> (..., h)`; "auto" takes the highest-priority one that accepts the
# tables and whose `auto` predicate allows it. Kernels live in their own modules (cpu.py, triton_kernels.py).


@dataclass
class Backend:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    accepts: Callable[[torch.Tensor], bool]  # can it run on these tables (device, dtype)?
    priority: int  # higher wins under "auto"
    auto: Callable[[torch.Tensor], bool] | None = None  # may "auto" pick it? (default: whenever it accepts)
    why_not: Callable[[torch.Tensor], str | None] | None = None  # reason it cannot run, for the fallback notice
    layer_fn: Callable | None = None  # optional hash + lookup in one call (see `memory_layer`)
    layer_grad: bool = False  # does layer_fn support autograd (else it only runs when nothing needs a gradient)?


def _embedding_bag_accepts(tables: torch.Tensor) -> bool:
    # Meta tensors have no embedding_bag backward; bf16/fp16 weight gradients are missing on CUDA (torch <= 2.11).
    if tables.device.type == "meta" or not tables.is_floating_point():
        return False
    needs_grad = tables.requires_grad and torch.is_grad_enabled()
    return not (tables.device.type == "cuda" and tables.dtype != torch.float32 and needs_grad)


_BACKENDS: dict[str, Backend] = {}
_resolved: dict[tuple, Backend] = {}  # memoised choices of resolve_backend

# The backend "auto" should land on for each device type; anything else there is a fallback and gets one log line.
PREFERRED = {"cuda": "triton", "cpu": "cpu"}


def register_backend(
    name: str, fn, *, accepts=lambda t: True, priority: int = 0, auto=None, why_not=None, layer_fn=None,
    layer_grad: bool = False,
) -> None:
    """Make `fn(codes, weights, tables) -> (..., h)` selectable as `backend=name` (and by "auto")."""
    _BACKENDS[name] = Backend(name, fn, accepts, priority, auto, why_not, layer_fn, layer_grad)
    _resolved.clear()


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
    log.warning(
        "memoryformer: %r kernel unavailable for %s (%s) -> using %r", wanted, what, reason or "unsupported", got.name
    )


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

    Args:
        codes: (..., K) integer tensor, values in [0, R).
        weights: (..., K) floating tensor.
        tables: (K, R, h) with R = 2**tau; floating, or int8 with `scale`.
        bias: (h,) or None.
        backend: a name from `backend_names()`.
        scale: (K, R) per-row dequantisation scale of int8 tables (see `memoryformer.ops.quant`), else None.
    Returns: (..., h) in the tables' dtype (the weights' dtype for int8 tables).
    """
    return _lookup(resolve_backend(backend, tables), codes, weights, tables, bias, scale)


def _lookup(b: Backend, codes, weights, tables, bias, scale) -> torch.Tensor:
    if scale is not None:  # an int8 row is scale * q: fold each hit row's scale into its weight
        weights = weights * scale[torch.arange(tables.shape[0], device=codes.device), codes]
    y = b.fn(codes, weights, tables)
    return y if bias is None else y + bias


def memory_layer(x, tables, bias=None, *, tau: int, weighting: str = "code", temperature: float = 1.0,
                 backend: str = "auto", scale=None) -> torch.Tensor:
    """`memory_lookup(*chunk_hash(x, tau, ...), tables, bias)`; a backend may fuse both steps (Triton: one kernel
    computes the hash inside the gather; CPU: fewer calls for inference, which decides batch-1 latency)."""
    b = resolve_backend(backend, tables)
    if b.layer_fn is not None and (b.layer_grad or not (_needs_grad(x, tables, bias) or torch.compiler.is_compiling())):
        return b.layer_fn(x, tables, bias, tau=tau, weighting=weighting, temperature=temperature, scale=scale)
    codes, weights = chunk_hash(x, tau, weighting=weighting, temperature=temperature)
    return _lookup(b, codes, weights, tables, bias, scale)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
