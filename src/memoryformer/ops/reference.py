"""The Memory Layer's math in plain PyTorch (Ding et al., NeurIPS 2024, paper §2.2-2.3), one function per equation.

A Memory Layer replaces y = x W (Eq. 1) by a lookup y = T[h(x)] (Eq. 2) made tractable by chunking: x (..., K*tau)
is cut into K chunks z_k of tau dims (Eq. 6); each chunk's sign pattern (Eq. 3) read as a binary number (Eq. 4)
is its hash h(z_k) (Eq. 5), which picks one of the 2**tau rows of its own table T_k (Eq. 7); the K rows are summed
with a differentiable weight of their chunk (Eq. 8-11). Gradients: Eq. 12. The block that wires three of these into
attention and two into the FFN replacement (Eq. 13) is in `memoryformer.model`.

This is the definition the backends are tested against, written as the paper writes it and not tuned for speed;
each backend computes the same hash its own way (`ops.cpu.chunk_hash`, the compiled and the Triton kernels).
Everything here runs on any dtype and device (float64 for the tests).
"""

from __future__ import annotations

import itertools

import torch

from memoryformer.config import DEFAULT_WEIGHTING, WEIGHTINGS


def sign(v: torch.Tensor) -> torch.Tensor:
    """Eq. 3: sign(v) = +1 if v >= 0 else -1 (zero goes to +1), in v's dtype."""
    return torch.where(v >= 0, 1.0, -1.0).to(v.dtype)


def sign_bits(z: torch.Tensor) -> torch.Tensor:
    """(sign(z) + 1) / 2 of Eq. 4 as bools: [z >= 0]."""
    return z >= 0


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Eq. 4, integer(s) = sum_i ((s_i + 1) / 2) 2^i, with Fig. 2's bit order: (..., tau) bool -> (...,) int64.

    Fig. 2 and the authors' code read chunk element 0 as the most significant bit (element i weighs 2^(tau-1-i));
    Eq. 4 as printed reads it as the least. `lsb_first` turns one order into the other.
    """
    tau = bits.shape[-1]
    place = 2 ** torch.arange(tau - 1, -1, -1, device=bits.device, dtype=torch.int64)
    return (bits.to(torch.int64) * place).sum(-1)


def lsb_first(x: torch.Tensor, tau: int) -> torch.Tensor:
    """Eq. 4 as printed (element i is bit i): each chunk reversed. The weights (Eq. 8-10) are symmetric in a
    chunk's elements, so hashing `lsb_first(x)` MSB-first is exactly the LSB-first layer."""
    return chunks(x, tau).flip(-1).flatten(-2)


def chunks(x: torch.Tensor, tau: int) -> torch.Tensor:
    """Eq. 6: z_k = split(x, K), (..., K * tau) -> (..., K, tau)."""
    return x.unflatten(-1, (-1, tau))


def hash_codes(z: torch.Tensor) -> torch.Tensor:
    """Eq. 5: h(z) = integer(sign(z)), (..., tau) -> (...,) int64 in [0, 2**tau)."""
    return pack_bits(sign_bits(z))


def gather_rows(codes: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Eq. 7: T_k[h(z_k)] for every chunk k. codes (..., K), tables (K, R, h) -> rows (..., K, h)."""
    return tables[torch.arange(tables.shape[0], device=codes.device), codes]


def similarity(z: torch.Tensor) -> torch.Tensor:
    """Eq. 8 at the chunk's own bucket: sim(z, h(z)) = <z, sign(z)> = sum_j |z_j|, (..., tau) -> (...). Written
    with |z_j|, whose derivative at z_j = 0 autograd (and every backend) takes as 0."""
    return z.abs().sum(-1)


def bucket_probability(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 9 as written: the softmax over all 2**tau buckets i of <z, b_i> / t (b_i in {-1, +1}^tau the sign
    pattern of bucket i), evaluated at the chunk's own bucket h(z). Costs 2**tau per chunk; Eq. 10 is its closed form.
    """
    tau = z.shape[-1]
    patterns = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=tau)), dtype=z.dtype, device=z.device)
    logits = z @ patterns.T / temperature  # (..., 2**tau); row i of `patterns` is bucket i in MSB-first order
    own = hash_codes(z)
    return logits.softmax(-1).gather(-1, own.unsqueeze(-1)).squeeze(-1)


def p(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 10: p(z) = 1 / prod_j (1 + exp(-2 |z_j| / t)), (..., tau) -> (...), in [2**-tau, 1)."""
    return 1.0 / (1.0 + torch.exp(-2.0 * z.abs() / temperature)).prod(-1)


def p_grad(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """dp/dz_j of Eq. 10, (..., tau) -> (..., tau): p * (2/t) * sign(z_j) * sigmoid(-2|z_j|/t) (the input part of
    Eq. 12; zero where z_j = 0, where |z_j| has no derivative and autograd takes 0)."""
    a = z.abs()
    return p(z, temperature)[..., None] * (2.0 / temperature) * torch.sgn(z) * torch.sigmoid(-2.0 * a / temperature)


def chunk_weights(z: torch.Tensor, weighting: str = DEFAULT_WEIGHTING, temperature: float = 1.0) -> torch.Tensor:
    """The differentiable weight of each chunk, (..., K, tau) -> (..., K).

    "paper": p(z) of Eq. 10. "release": sim(z, h(z)) * p(z) (Eq. 8 times Eq. 10), what the authors' released code
    computes.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    w = p(z, temperature)
    return similarity(z) * w if weighting == "release" else w


def chunk_hash(x: torch.Tensor, tau: int, *, weighting: str = DEFAULT_WEIGHTING, temperature: float = 1.0):
    """Codes (Eq. 5) and weights (Eq. 10, or Eq. 8 x Eq. 10) of the K = x.shape[-1] // tau chunks (Eq. 6) of x.

    Returns codes (..., K) int64 in [0, 2**tau) (MSB first, see `pack_bits`) and weights (..., K): float32 for
    half inputs (a weight is a product of tau factors), else x's dtype. Every backend's hash follows these dtypes.
    """
    z = chunks(x, tau)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return hash_codes(z), chunk_weights(z, weighting, temperature)


def result_dtype(weights: torch.Tensor, tables: torch.Tensor) -> torch.dtype:
    """Float tables give outputs in their own dtype; int8 tables (their row scales folded into the weights) in the
    weights' dtype. Every backend follows this rule."""
    return tables.dtype if tables.is_floating_point() else weights.dtype


def lookup_reference(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Eq. 11: y = sum_k weights[..., k] * T_k[codes[..., k]]. codes (..., K) integer in [0, R); weights (..., K);
    tables (K, R, h) -> (..., h) in `result_dtype`. Plain indexing, O(N*K*h) memory."""
    rows = gather_rows(codes, tables).to(result_dtype(weights, tables))  # (..., K, h)
    return torch.einsum("...k,...kh->...h", weights.to(rows.dtype), rows)


def lookup_grads(grad: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor):
    """Eq. 12 for the lookup of Eq. 11, given grad = dL/dy (..., h):

    dL/dT_k[i] = sum over tokens with h(z_k) = i of w_k * dL/dy (zero for rows no token hits), and
    dL/dw_k = <dL/dy, T_k[h(z_k)]>, which reaches the input through dw/dz (`p_grad`) only: the code is a constant.
    Returns (grad_weights (..., K), grad_tables (K, R, h)).
    """
    K, R, h = tables.shape
    grad_weights = (gather_rows(codes, tables) * grad[..., None, :]).sum(-1)
    flat = (codes.reshape(-1, K) + torch.arange(K, device=codes.device) * R).reshape(-1)  # row k*R + code
    contrib = (weights.reshape(-1, K, 1) * grad.reshape(-1, 1, h)).reshape(-1, h)
    grad_tables = torch.zeros(K * R, h, dtype=contrib.dtype, device=tables.device).index_add_(0, flat, contrib)
    return grad_weights, grad_tables.view(K, R, h)


def row_scales(scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The per-row dequantisation scale (K, R) of int8 tables at each hit row: (..., K). An int8 row is scale * q,
    so its scale folds into the row's weight and kernels only ever read the int8 rows."""
    return scale[torch.arange(scale.shape[0], device=codes.device), codes]
