"""The Memory Layer's math in plain PyTorch (Ding et al., NeurIPS 2024, §2.2-2.3), one function per equation.

A Memory Layer replaces y = x W (Eq. 1) by a lookup y = T[h(x)] (Eq. 2) made tractable by chunking: x (..., K*tau)
is cut into K chunks z_k of tau dims (Eq. 6); each chunk's sign pattern (Eq. 3) read as a binary number (Eq. 4-5)
picks one of the 2**tau rows of its own table T_k (Eq. 7), and the K rows are summed with a differentiable weight of
their chunk (Eq. 8-11). Gradients (Eq. 12): dL/dT_k[i] = w_k * dL/dy for the row hit, zero elsewhere;
dL/dw_k = <dL/dy, T_k[code_k]>, which reaches x through dw/dz only (the code is a constant). The block that wires
three of these into attention and two into the FFN replacement (Eq. 13) is in `memoryformer.model`.

Everything here runs on any dtype and device (float64 for the tests that check the fast kernels against it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memoryformer.config import DEFAULT_WEIGHTING, WEIGHTINGS, canonical_weighting

_BYTE_GATHER = 0x8040201008040201 - (1 << 64)  # as int64: moves byte j of a word to bit 63 - j


def chunks(x: torch.Tensor, tau: int) -> torch.Tensor:
    """Eq. 6: z_k = split(x, K), (..., K * tau) -> (..., K, tau)."""
    return x.unflatten(-1, (-1, tau))


def sign_bits(z: torch.Tensor) -> torch.Tensor:
    """Eq. 3: sign(v) = +1 if v >= 0 else -1, as bits [v >= 0] (zero goes to +1)."""
    return z >= 0


def pack_bits(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Eq. 4-5 with Fig. 2's bit order: (..., tau) bool -> (...,) int64 codes, element j weighted 2**(tau-1-j).

    Fig. 2 and the authors' code read element 0 as the most significant bit; Eq. 4 as printed reads it as the least
    (`lsb_first` turns one into the other). tau = 8 (the paper's choice): the 8 bools of a chunk are one
    little-endian int64 whose byte j is bit j; one multiply by 0x8040201008040201 moves bit j to bit 63-j without
    carries, so the code is the top byte. Other tau: float arithmetic, exact (sums of distinct powers of two < 2**16),
    a GEMV for large inputs. Both are several times faster on CPU than an int64 multiply-and-reduce.
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


def lsb_first(x: torch.Tensor, tau: int) -> torch.Tensor:
    """Eq. 4 as printed (element j is bit j): the MSB-first code of each chunk reversed. The weights are symmetric
    in the chunk's elements, so hashing `lsb_first(x)` MSB-first is exactly the LSB-first layer."""
    return chunks(x, tau).flip(-1).flatten(-2)


def chunk_weights(z: torch.Tensor, weighting: str = DEFAULT_WEIGHTING, temperature: float = 1.0) -> torch.Tensor:
    """The differentiable weight of each chunk, (..., K, tau) -> (..., K).

    "paper": p(z) = 1 / prod_j (1 + exp(-2|z_j|/t)) (Eq. 10), the closed form of the softmax over all 2**tau buckets
    (Eq. 9) evaluated at the chunk's own bucket, whose similarity is <z, sign(z)> = ||z||_1 (Eq. 8).
    "release": ||z||_1 * p(z) with t as given: what the authors' released code computes (spec §2.4).
    The product of tau sigmoids is summed in log space, so it cannot underflow.
    """
    weighting = canonical_weighting(weighting)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    a = z.abs()  # |z_j|; sum_j |z_j| = <z, sign(z)>, Eq. 8
    p = F.logsigmoid(a * (2.0 / temperature)).sum(-1).exp()  # Eq. 10
    return a.sum(-1) * p if weighting == "release" else p


def chunk_hash(x: torch.Tensor, tau: int, *, weighting: str = DEFAULT_WEIGHTING, temperature: float = 1.0):
    """Codes and weights of the K = x.shape[-1] // tau chunks of x (already normalised by the caller).

    Returns codes (..., K) int64 in [0, 2**tau) (MSB first, see `pack_bits`) and weights (..., K) (float32 for half
    inputs: the weights are products of tau sigmoids; else x's dtype).
    """
    z = chunks(x, tau)  # (..., K, tau)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return pack_bits(sign_bits(z), z.dtype), chunk_weights(z, weighting, temperature)


def result_dtype(weights: torch.Tensor, tables: torch.Tensor) -> torch.dtype:
    """Float tables give outputs in their own dtype; int8 tables (their row scales folded into the weights) in the
    weights' dtype. Every backend follows this rule."""
    return tables.dtype if tables.is_floating_point() else weights.dtype


def lookup_reference(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Eq. 7 and 11: y[..., :] = sum_k weights[..., k] * tables[k, codes[..., k], :]. Plain indexing, O(N*K*h) memory.

    codes (..., K) integer in [0, R); weights (..., K); tables (K, R, h) -> (..., h).
    """
    K = tables.shape[0]
    rows = tables[torch.arange(K, device=codes.device), codes]  # (..., K, h)
    rows = rows.to(result_dtype(weights, tables))
    return torch.einsum("...k,...kh->...h", weights.to(rows.dtype), rows)


def row_scales(scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The per-row dequantisation scale (K, R) of int8 tables at each hit row: (..., K). An int8 row is scale * q,
    so its scale folds into the row's weight and kernels only ever read the int8 rows."""
    return scale[torch.arange(scale.shape[0], device=codes.device), codes]
