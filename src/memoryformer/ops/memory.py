"""The Memory Layer op (MemoryFormer, Ding et al., NeurIPS 2024, §2.2–2.3).

A Memory Layer cuts its input x (..., K*tau) into K chunks z_k of tau dims, hashes each chunk by its sign pattern to
one of 2**tau rows of table T_k, and returns y = sum_k w(z_k) * T_k[h(z_k)] (+ bias).

Two pieces live here:
* `chunk_hash(x, tau)` -> (codes, weights): Eq. 3-10. Codes are integers (no gradient); weights are differentiable.
* `memory_lookup(codes, weights, tables, bias, backend=...)`: the weighted gather of Eq. 11, with several backends
  behind one call. "reference" is plain PyTorch indexing (any dtype, float64 for tests); "embedding_bag" uses
  `F.embedding_bag(mode="sum", per_sample_weights=...)`. Faster backends register themselves with
  `register_backend`; "auto" picks the best one that accepts the tensors.

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
    place = 2 ** torch.arange(tau - 1, -1, -1, device=x.device, dtype=torch.int64)  # (tau,) MSB first
    codes = ((z >= 0).to(torch.int64) * place).sum(-1)  # (..., K)  Eq. 3-4 (with Fig. 2's bit order)
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


@dataclass
class Backend:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    accepts: Callable[[torch.Tensor], bool]  # can it run on these tables (device, dtype)?
    priority: int  # higher wins under "auto"


def _embedding_bag_accepts(tables: torch.Tensor) -> bool:
    # Meta tensors have no embedding_bag backward; bf16/fp16 weight gradients are missing on CUDA (torch <= 2.11).
    if tables.device.type == "meta":
        return False
    return not (tables.device.type == "cuda" and tables.dtype != torch.float32 and tables.requires_grad)


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn, *, accepts=lambda t: True, priority: int = 0) -> None:
    """Make `fn(codes, weights, tables) -> (..., h)` selectable as `backend=name` (and by "auto")."""
    _BACKENDS[name] = Backend(name, fn, accepts, priority)


register_backend("reference", lookup_reference, priority=0)
register_backend("embedding_bag", lookup_embedding_bag, accepts=_embedding_bag_accepts, priority=10)


def backend_names() -> list[str]:
    return ["auto", *_BACKENDS]


_fallback_noted: set[tuple[str, str]] = set()


def resolve_backend(backend: str, tables: torch.Tensor) -> Backend:
    """The backend `memory_lookup` would run for these tables."""
    if backend == "auto":
        ok = [b for b in _BACKENDS.values() if b.accepts(tables)]
        return max(ok, key=lambda b: b.priority)
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {backend_names()}, got {backend!r}")
    b = _BACKENDS[backend]
    if not b.accepts(tables):
        fallback = resolve_backend("auto", tables)
        key = (backend, fallback.name)
        if key not in _fallback_noted:
            _fallback_noted.add(key)
            log.warning(
                "memoryformer: backend %r cannot run on %s %s tables -> using %r",
                backend, tables.device.type, str(tables.dtype).removeprefix("torch."), fallback.name,
            )
        return fallback
    return b


def memory_lookup(codes, weights, tables, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """Eq. 11: y = sum_k weights[..., k] * tables[k, codes[..., k]] (+ bias).

    Args:
        codes: (..., K) integer tensor, values in [0, R).
        weights: (..., K) floating tensor.
        tables: (K, R, h) with R = 2**tau.
        bias: (h,) or None.
    Returns: (..., h) in the tables' dtype.
    """
    y = resolve_backend(backend, tables).fn(codes, weights, tables)
    return y if bias is None else y + bias
