"""CPU kernels for the Memory Layer, written with PyTorch ops, plus one compiled decode kernel (`cpu_ext`).

Forward: one fused weighted embedding-bag over the flattened (K*R, h) table (fbgemm's JIT-generated kernel behind
`F.embedding_bag` for fp32/bf16/fp16; its 8-bit row-wise kernel for int8 tables, which reads 1/4 of the fp32 bytes).
Measured on 2 CPU cores it beats gathering the K rows with `index_select` and reducing them with `bmm` at every batch
size from 1 to 2048 tokens, because it never materialises the (N, K, h) rows.

Backward (training on CPU): ATen's embedding-bag backward kernels (grad_tables sorted per row, hence deterministic;
grad_weights[n, k] = <g[n], T[k, c[n, k]]>), as fast as `F.embedding_bag` under autograd. A general fallback gathers
rows in token chunks that stay in cache and scatters w * g rows with `index_add_` (sequential per row on CPU).

Hash: `chunk_hash` (Eq. 3-10), the one this backend uses for training and inference alike.

`layer_forward` fuses the hash with the lookup for inference: exactly the numbers of `chunk_hash` + `memory_lookup`
in about half the PyTorch calls, which is most of a batch-1 layer's latency. For 1-2 tokens it hands the whole layer
to the compiled kernel of `cpu_ext` (one call; built on first use, skipped without a compiler; its own hash, the
same codes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memoryformer.ops import cpu_ext
from memoryformer.ops.dispatch import register_backend
from memoryformer.ops.library import define_lookup_op, flat_call

_CHUNK_ELEMS = 1 << 20  # rows gathered per backward step (4 MB in fp32): stays in L2/L3 without a Python-bound loop
_BYTE_GATHER = 0x8040201008040201 - (1 << 64)  # as int64: moves byte j of a word to bit 63 - j


# ---------------------------------------------------------------------------------------------------------------
# The hash (Eq. 3-10), the same numbers for training and for inference.


def pack_codes(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`reference.pack_bits` (Eq. 4, MSB first), several times faster on CPU than an int64 multiply-and-reduce.

    tau = 8 (the paper's choice): the 8 bools of a chunk are one little-endian int64 whose byte j is bit j; one
    multiply by 0x8040201008040201 moves bit j to bit 63-j without carries, so the code is the top byte. Other tau:
    float arithmetic in `dtype`, exact (sums of distinct powers of two below 2**16), a GEMV for large inputs.
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


def _hash_chunks(z: torch.Tensor, weighting: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and weights of chunks z (..., K, tau), float32 or float64."""
    a = z.abs()
    # p(z) of Eq. 10 as a sum of tau log-sigmoids: no underflow whatever tau and t
    w = F.logsigmoid(a * (2.0 / temperature)).sum(-1).exp()
    if weighting == "release":
        w = a.sum(-1) * w  # Eq. 8: sim(z, h(z)) = ||z||_1
    return pack_codes(z >= 0, z.dtype), w


def chunk_hash(x: torch.Tensor, tau: int, *, weighting: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.chunk_hash` on CPU tensors: the same codes, the same weights up to rounding."""
    z = x.unflatten(-1, (-1, tau))
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return _hash_chunks(z, weighting, temperature)


# ---------------------------------------------------------------------------------------------------------------
# The lookup (Eq. 11) and its gradients (Eq. 12)


def _flat_index(codes: torch.Tensor, R: int) -> torch.Tensor:
    K = codes.shape[-1]
    return (codes + torch.arange(0, K * R, R, device=codes.device, dtype=codes.dtype)).reshape(-1)  # (N*K,)


def _has_byte_kernel() -> bool:
    return hasattr(torch.ops.quantized, "embedding_bag_byte_rowwise_offsets")


def _byte_bag(packed: torch.Tensor, idx: torch.Tensor, bags: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fbgemm's 8-bit row-wise embedding bag, mode sum, with per-sample weights."""
    return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(packed, idx, bags, False, 0, False, w)


_BYTE_TAIL = torch.tensor([1.0, -128.0], dtype=torch.float32).view(torch.uint8)  # scale 1, bias -128


def pack_int8(tables: torch.Tensor) -> torch.Tensor:
    """fbgemm's 8-bit row layout of int8 tables q (K, R, h) or rows q (M, h): (K*R or M, h + 8) uint8 rows
    [q + 128 | scale=1.0 | bias=-128.0]. The per-row scale is folded into the weights before the kernel runs, so
    the packed rows stay scale-free. A frozen layer keeps its own (`MemoryLayer.packed_tables`, `ops.pack_tables`).
    """
    rows = tables.reshape(-1, tables.shape[-1])
    packed = torch.empty(rows.shape[0], rows.shape[1] + 8, dtype=torch.uint8, device=rows.device)
    torch.bitwise_xor(rows.view(torch.uint8), 128, out=packed[:, : rows.shape[1]])  # q + 128 as two's complement
    packed[:, rows.shape[1] :] = _BYTE_TAIL
    return packed


def pack(tables: torch.Tensor) -> torch.Tensor | None:
    """The layout the int8 kernel reads, for the backend's `pack` (None: these tables need none)."""
    return pack_int8(tables) if tables.dtype == torch.int8 and _has_byte_kernel() else None


def _int8_bag(tables, idx, bags, w, packed=None) -> torch.Tensor:
    """Eq. 11 over int8 rows with fbgemm's byte kernel: over the whole packed table if given, else over the rows
    hit packed for this call (the same sums in the same order; about 4x slower than a packed table)."""
    if packed is None:
        packed = pack_int8(tables.reshape(-1, tables.shape[-1]).index_select(0, idx))
        idx = torch.arange(idx.numel(), dtype=idx.dtype)
    return _byte_bag(packed, idx, bags, w)


def forward(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """codes (N, K), weights (N, K), tables (K, R, h) -> (N, h)."""
    N, K = codes.shape
    R, h = tables.shape[1], tables.shape[2]
    idx = _flat_index(codes, R)
    bags = torch.arange(0, N * K, K, device=codes.device, dtype=idx.dtype)
    if not tables.is_floating_point():  # int8 rows, scale already in the weights
        if _has_byte_kernel():
            w = weights.reshape(-1).float()
            return _int8_bag(tables, idx, bags, w).to(weights.dtype)
        rows = tables.reshape(K * R, h).index_select(0, idx).view(N, K, h).to(weights.dtype)
        return torch.bmm(weights.unsqueeze(1), rows).squeeze(1)
    w = weights.reshape(-1).to(tables.dtype)
    return F.embedding_bag(idx, tables.reshape(K * R, h), bags, mode="sum", per_sample_weights=w)


def backward(grad, codes, weights, tables, need_weights: bool, need_tables: bool):
    """grad (N, h) -> (grad_weights (N, K) in the weights' dtype, grad_tables (K, R, h) in the tables' dtype).

    Sums run in fp32 for bf16/fp16 tables (fp64 when anything is fp64).
    """
    if tables.is_floating_point():
        try:
            return _embedding_bag_backward(grad, codes, weights, tables, need_weights, need_tables)
        except (RuntimeError, AttributeError, TypeError):  # private ATen signatures may move: the general path
            pass
    return _chunked_backward(grad, codes, weights, tables, need_weights, need_tables)


def _acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _embedding_bag_backward(grad, codes, weights, tables, need_weights: bool, need_tables: bool):
    """ATen's embedding-bag backward kernels, called as autograd would after the fbgemm forward (whose
    offset2bag comes back empty): the fastest CPU path measured, sorted per row and hence deterministic.
    They sum in their inputs' dtype and write in it, so bf16/fp16 tables are widened to fp32 first (a transient
    fp32 copy of one table; the weight gradient's outputs would otherwise be rounded to bf16)."""
    N, K = codes.shape
    R, h = tables.shape[1], tables.shape[2]
    acc = _acc_dtype(grad, weights, tables)
    idx = _flat_index(codes, R)
    bags = torch.arange(0, N * K, K, dtype=idx.dtype)
    psw = weights.reshape(-1).to(acc)
    g = grad.to(acc)
    empty, zeros = idx.new_empty(0), idx.new_zeros(N)
    gw, gt = weights.new_empty((0,)), tables.new_empty((0,))
    if need_tables:
        gt = torch.ops.aten._embedding_bag_backward(g, idx, bags, empty, zeros, zeros, K * R, False, 0, False, psw, -1)
        gt = gt.view(K, R, h).to(tables.dtype)
    if need_weights:
        flat = tables.reshape(K * R, h).to(acc)
        gw = torch.ops.aten._embedding_bag_per_sample_weights_backward(g, flat, idx, bags, empty, 0, -1)
        gw = gw.view(N, K).to(weights.dtype)
    return gw, gt


def _chunked_backward(grad, codes, weights, tables, need_weights: bool, need_tables: bool):
    N, K = codes.shape
    R, h = tables.shape[1], tables.shape[2]
    acc = _acc_dtype(grad, weights, tables)
    flat = tables.reshape(K * R, h)
    idx = _flat_index(codes, R).view(N, K)
    g = grad.to(acc)
    gw = torch.empty(N, K, dtype=acc) if need_weights else weights.new_empty((0,))
    gt = torch.zeros(K * R, h, dtype=acc) if need_tables else tables.new_empty((0,))
    step = max(1, _CHUNK_ELEMS // (K * h))
    for s in range(0, N, step):
        e = min(N, s + step)
        ix = idx[s:e].reshape(-1)
        if need_weights:
            rows = flat.index_select(0, ix).view(e - s, K, h).to(acc)
            torch.bmm(rows, g[s:e].unsqueeze(-1), out=gw[s:e].unsqueeze(-1))
        if need_tables:
            gt.index_add_(0, ix, (weights[s:e, :, None].to(acc) * g[s:e, None, :]).reshape(-1, h))
    if need_weights:
        gw = gw.to(weights.dtype)
    if need_tables:
        gt = gt.view(K, R, h).to(tables.dtype)
    return gw, gt


# ---------------------------------------------------------------------------------------------------------------
# Table gradients as touched rows (`sparse_grad=True`, for row-wise optimizers, `memoryformer.optim`): a micro-batch
# hits only part of a table's rows (5-20 % in the later blocks of a trained micro model), so the dense (K, R, h)
# gradient is mostly zeros.


def touched_rows_backward(grad, codes, weights, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (U,) sorted unique flat row ids k*R + code, values (U, h)): the table gradient on the rows hit.

    ATen's embedding-bag backward on the compacted ids (row -> its rank among the hit rows) writes a (U, h)
    result instead of a (K*R, h) one; the sums are fp32 (fp64 for fp64 inputs) whatever the tables' dtype.
    """
    N, K = codes.shape
    R, h = tables.shape[1], tables.shape[2]
    acc = _acc_dtype(grad, weights, tables)
    idx = _flat_index(codes, R)
    hit = torch.bincount(idx, minlength=K * R) > 0  # the ids are bounded: count instead of sorting (torch.unique)
    rows = hit.nonzero().squeeze(1)
    inv = (torch.cumsum(hit, 0) - 1).index_select(0, idx)  # row id -> its rank among the hit rows
    g, psw = grad.to(acc), weights.reshape(-1).to(acc)
    try:
        bags = torch.arange(0, N * K, K, dtype=idx.dtype)
        empty, zeros = idx.new_empty(0), idx.new_zeros(N)
        vals = torch.ops.aten._embedding_bag_backward(g, inv, bags, empty, zeros, zeros, rows.numel(), False, 0,
                                                      False, psw, -1)
    except (RuntimeError, AttributeError, TypeError):  # private ATen signature moved: token chunks + index_add_
        vals = torch.zeros(rows.numel(), h, dtype=acc)
        inv = inv.view(N, K)
        step = max(1, _CHUNK_ELEMS // (K * h))
        for s in range(0, N, step):
            e = min(N, s + step)
            vals.index_add_(0, inv[s:e].reshape(-1), (psw.view(N, K)[s:e, :, None] * g[s:e, None, :]).reshape(-1, h))
    return rows, vals


lookup_op = define_lookup_op("lookup_cpu", forward, backward, touched_rows=touched_rows_backward)
lookup = flat_call(lookup_op)


def accepts(tables: torch.Tensor) -> bool:
    """Float and int8 tables; int4 (uint8) ones too, whose lookup `dispatch` runs (`int4.int4_lookup`) with this
    backend's hash."""
    return tables.device.type == "cpu" and (tables.is_floating_point() or tables.dtype in (torch.int8, torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Inference: hash + lookup in one function (batch-1 decode is dominated by per-call overhead, not bytes).

_CONSTS: dict[tuple, torch.Tensor] = {}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)  # the tables the compiled kernel reads


def _const(key: tuple, make) -> torch.Tensor:
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = make()
    return t


def layer_forward(x, tables, bias, *, tau: int, weighting: str, temperature: float, scale=None,
                  packed=None) -> torch.Tensor:
    """Inference-only `memory_lookup(*chunk_hash(x, tau, ...), tables, bias, scale=scale)` for CPU tensors;
    `packed`: int8 tables in fbgemm's row layout (`pack`), made once by the caller."""
    lead = x.shape[:-1]
    K, R, h = tables.shape
    if (x.numel() <= cpu_ext.MAX_TOKENS * K * tau and x.device.type == "cpu" and tables.dtype in _KERNEL_DTYPES
            and x.dtype != torch.float64):  # float64 stays float64 on the ATen path: the kernel sums in float32
        ext = cpu_ext.get()
        if ext is not None:  # one compiled call instead of ~15 small ones: batch-1 decode
            y = ext.decode(x, tables, scale, bias, tau, weighting == "release", float(temperature))
            dtype = tables.dtype if tables.is_floating_point() else torch.float32  # as the ATen path below
            if bias is not None:
                dtype = torch.promote_types(dtype, bias.dtype)
            return y.to(dtype).reshape(*lead, h)
    z = x.reshape(-1, K, tau)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    N = z.shape[0]
    start = _const(("start", K, R), lambda: torch.arange(0, K * R, R))
    codes, w = _hash_chunks(z, weighting, temperature)  # (N, K) each
    if scale is not None:
        w = w * scale.view(-1)[codes + start]
    bags = _const(("bags", N, K), lambda: torch.arange(0, N * K, K)) if N <= 64 else torch.arange(0, N * K, K)
    idx = (codes + start).view(-1)
    if tables.is_floating_point():
        flat = tables.reshape(K * R, h)
        y = F.embedding_bag(idx, flat, bags, mode="sum", per_sample_weights=w.view(-1).to(tables.dtype))
    elif _has_byte_kernel():
        y = _int8_bag(tables, idx, bags, w.view(-1), packed)
    else:
        y = forward(codes, w, tables)
    if bias is not None:
        y = y.add_(bias) if y.dtype == bias.dtype else y + bias
    return y.reshape(*lead, h)


register_backend("cpu", lookup, accepts=accepts, priority=20, hash_fn=chunk_hash, layer_fn=layer_forward, pack=pack,
                 sparse_grad=True)
