"""Triton kernels for the Memory Layer (CUDA; also run on CPU tensors under TRITON_INTERPRET=1 for tests).

This module imports triton; `memoryformer.ops` only imports it on first use of the "triton" backend.

Design: a lookup is bandwidth-bound, and each table has only 2**tau rows, so the same rows are fetched by many
tokens. Every kernel tiles BLOCK_N tokens x BLOCK_H output dims per program and
gathers the rows for the tile straight from global memory; with the token tile as the fastest grid axis, programs in
flight share one BLOCK_H-wide column slice of all K tables (K * R * BLOCK_H elements, a few MB), which stays in L2.
On an H100, 32 x 64 tiles moved 8.3 TB/s of row traffic (HBM copy: 2.9 TB/s), 2.2x a one-token-per-program kernel,
while staging a table tile on chip and using `tl.gather` was 20-70x slower. Accumulation is fp32 (fp64 for fp64 tables).

* forward: y[n, j] = sum_k w[n, k] * T[k, c[n, k], j]
* grad_weights: partial dot products <g[n, tile], T[k, c[n, k], tile]> per output tile, summed over tiles on the
  host (no atomics, deterministic).
* grad_tables: the (n, k) pairs are sorted by row (stable), then one program per (row, output tile) sums its
  segment of w * g: each table row is written once, deterministic, and it moves the same bytes as the forward.
  `KernelConfig(table_grad="atomic")` uses a float32 atomic-add scatter instead: no sort, but not deterministic, and
  contended (each row is hit ~N/2**tau times; on an H100 it took 5x the forward).
* the whole layer (`layer_forward`): the hash is computed inside the gather kernel (each output tile recomputes it:
  tau exponentials per 64-wide row slice) and its input gradient in one small kernel, instead of ~10
  PyTorch elementwise passes over the (N, K*tau) input.

Tiles and the table-gradient method are arguments (`KernelConfig`), never module state: the registered
`torch.library` ops run the defaults (what `torch.compile` traces), and `lookup(..., config)` / `layer_forward(...,
config=...)` run any other choice eagerly (tile sweeps, the atomic scatter) through a plain autograd.Function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from memoryformer.ops.library import define_lookup_op, flat_call
from memoryformer.ops.reference import chunk_hash, result_dtype, row_scales


class KernelConfig(NamedTuple):
    """Tiles (tokens x output dims per program) of each kernel and the table-gradient method."""

    fwd: tuple[int, int] = (32, 64)  # forward gather (and the fused hash + gather)
    bwd: tuple[int, int] = (32, 128)  # grad-weights partial dot products (and the atomic scatter)
    seg: tuple[int, int] = (16, 128)  # sorted table gradient: pairs per step x output dims
    table_grad: str = "sorted"  # or "atomic"


DEFAULT = KernelConfig()


@triton.jit
def _forward_kernel(
    codes_ptr, w_ptr, tab_ptr, out_ptr, N, H, R,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, F64: tl.constexpr,
):
    acc_t = tl.float64 if F64 else tl.float32
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mn, mh = n < N, j < H
    m2 = mn[:, None] & mh[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_H), acc_t)
    for k in range(K):
        c = tl.load(codes_ptr + n * K + k, mask=mn, other=0).to(tl.int64)
        w = tl.load(w_ptr + n * K + k, mask=mn, other=0.0).to(acc_t)
        rows = tl.load(tab_ptr + (k * R + c)[:, None] * H + j[None, :], mask=m2, other=0.0).to(acc_t)
        acc += w[:, None] * rows
    out = out_ptr + n.to(tl.int64)[:, None] * H + j[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _grad_weights_kernel(
    codes_ptr, g_ptr, tab_ptr, part_ptr, N, H, R,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, F64: tl.constexpr,
):
    """part[tile_h, k, n] = <g[n, tile_h], T[k, c[n, k], tile_h]>; laid out so the stores are coalesced over n."""
    acc_t = tl.float64 if F64 else tl.float32
    pid_h = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mn, mh = n < N, j < H
    m2 = mn[:, None] & mh[None, :]
    g = tl.load(g_ptr + n.to(tl.int64)[:, None] * H + j[None, :], mask=m2, other=0.0).to(acc_t)
    for k in range(K):
        c = tl.load(codes_ptr + n * K + k, mask=mn, other=0).to(tl.int64)
        rows = tl.load(tab_ptr + (k * R + c)[:, None] * H + j[None, :], mask=m2, other=0.0).to(acc_t)
        tl.store(part_ptr + (pid_h * K + k) * N + n, tl.sum(rows * g, axis=1), mask=mn)


@triton.jit
def _grad_tables_sorted_kernel(
    order_ptr, starts_ptr, wt_ptr, g_ptr, gt_ptr, N, H,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, F64: tl.constexpr,
):
    """Row `row` of the flat (K*R, H) gradient = sum over its sorted segment of pairs p = k*N + n of w[p] * g[n]."""
    acc_t = tl.float64 if F64 else tl.float32
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = j < H
    start = tl.load(starts_ptr + row)
    count = tl.load(starts_ptr + row + 1) - start
    acc = tl.zeros((BLOCK_T, BLOCK_H), acc_t)
    for t in range(0, count, BLOCK_T):
        i = t + tl.arange(0, BLOCK_T)
        mt = i < count
        p = tl.load(order_ptr + start + i, mask=mt, other=0)
        w = tl.load(wt_ptr + p, mask=mt, other=0.0).to(acc_t)
        n = (p % N).to(tl.int64)
        g = tl.load(g_ptr + n[:, None] * H + j[None, :], mask=mt[:, None] & mh[None, :], other=0.0).to(acc_t)
        acc += w[:, None] * g
    out = gt_ptr + row.to(tl.int64) * H + j
    tl.store(out, tl.sum(acc, axis=0).to(gt_ptr.dtype.element_ty), mask=mh)


@triton.jit
def _grad_tables_atomic_kernel(
    codes_ptr, w_ptr, g_ptr, gt_ptr, N, H, R,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mn, mh = n < N, j < H
    m2 = mn[:, None] & mh[None, :]
    g = tl.load(g_ptr + n.to(tl.int64)[:, None] * H + j[None, :], mask=m2, other=0.0).to(gt_ptr.dtype.element_ty)
    for k in range(K):
        c = tl.load(codes_ptr + n * K + k, mask=mn, other=0).to(tl.int64)
        w = tl.load(w_ptr + n * K + k, mask=mn, other=0.0).to(gt_ptr.dtype.element_ty)
        tl.atomic_add(gt_ptr + (k * R + c)[:, None] * H + j[None, :], w[:, None] * g, mask=m2)


def _is_f64(*ts: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in ts)


def forward(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, config: KernelConfig = DEFAULT
            ) -> torch.Tensor:
    """codes (N, K), weights (N, K), tables (K, R, h) contiguous -> (N, h)."""
    N, K = codes.shape
    R, H = tables.shape[1], tables.shape[2]
    out = torch.empty(N, H, device=tables.device, dtype=result_dtype(weights, tables))
    if N == 0:
        return out
    bn, bh = config.fwd
    wrap_triton(_forward_kernel)[(triton.cdiv(N, bn), triton.cdiv(H, bh))](
        codes, weights, tables, out, N, H, R, K=K, BLOCK_N=bn, BLOCK_H=bh,
        F64=_is_f64(weights, tables),
    )
    return out


def backward(grad, codes, weights, tables, need_weights: bool, need_tables: bool, config: KernelConfig = DEFAULT):
    """(grad_weights (N, K) or empty, grad_tables (K, R, h) or empty) of the forward's output gradient `grad`."""
    if config.table_grad not in ("sorted", "atomic"):
        raise ValueError(f"table_grad: expected 'sorted' or 'atomic', got {config.table_grad!r}")
    N, K = codes.shape
    R, H = tables.shape[1], tables.shape[2]
    f64 = _is_f64(grad, weights, tables)
    dev = tables.device
    gw = weights.new_empty((0,))
    gt = tables.new_empty((0,))
    if N == 0:
        return (torch.zeros_like(weights) if need_weights else gw), (torch.zeros_like(tables) if need_tables else gt)
    bn, bh = config.bwd
    if need_weights:
        gw = _grad_weight_parts(grad, codes, tables, f64, config).sum(0).t().to(weights.dtype).contiguous()  # (N, K)
    if need_tables and config.table_grad == "atomic":
        acc = torch.zeros(K, R, H, device=dev, dtype=torch.float64 if f64 else torch.float32)
        wrap_triton(_grad_tables_atomic_kernel)[(triton.cdiv(N, bn), triton.cdiv(H, bh))](
            codes, weights, grad, acc, N, H, R, K=K, BLOCK_N=bn, BLOCK_H=bh,
        )
        gt = acc.to(tables.dtype)
    elif need_tables:
        # Pair p = k*N + n hits flat row k*R + c[n, k]; a stable sort by row fixes the summation order.
        rows = (codes.t() + torch.arange(0, K * R, R, device=dev, dtype=codes.dtype)[:, None]).reshape(-1)
        rows, order = torch.sort(rows.to(torch.int32), stable=True)
        starts = torch.searchsorted(rows, torch.arange(K * R + 1, device=dev, dtype=torch.int32), out_int32=True)
        wt = weights.t().contiguous()  # (K, N): w of pair p at wt[p]
        gt = torch.empty(K, R, H, device=dev, dtype=tables.dtype)
        st, sh = config.seg
        wrap_triton(_grad_tables_sorted_kernel)[(K * R, triton.cdiv(H, sh))](
            order, starts, wt, grad, gt, N, H, BLOCK_T=st, BLOCK_H=sh, F64=f64,
        )
    return gw, gt


def _grad_weight_parts(grad, codes, tables, f64: bool, config: KernelConfig) -> torch.Tensor:
    """(output tiles, K, N) partial dot products <g[n, tile], T[k, c[n, k], tile]>; their sum over tiles is dL/dw."""
    N, K = codes.shape
    R, H = tables.shape[1], tables.shape[2]
    bn, bh = config.bwd
    tiles = triton.cdiv(H, bh)
    part = torch.empty(tiles, K, N, device=tables.device, dtype=torch.float64 if f64 else torch.float32)
    wrap_triton(_grad_weights_kernel)[(triton.cdiv(N, bn), tiles)](
        codes, grad, tables, part, N, H, R, K=K, BLOCK_N=bn, BLOCK_H=bh, F64=f64,
    )
    return part


lookup_op = define_lookup_op("lookup_triton", forward, backward, triton=True)
_flat_lookup = flat_call(lookup_op)


class _ConfiguredLookup(torch.autograd.Function):
    """The lookup with a non-default `KernelConfig`, eager only (the registered op runs the defaults)."""

    @staticmethod
    def forward(ctx, codes, weights, tables, config):
        ctx.save_for_backward(codes, weights, tables)
        ctx.config = config
        return forward(codes, weights, tables, config)

    @staticmethod
    def backward(ctx, grad):
        codes, weights, tables = ctx.saved_tensors
        need_w, need_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        gw, gt = backward(grad.contiguous(), codes, weights, tables, need_w, need_t, ctx.config)
        return None, gw if need_w else None, gt if need_t else None, None


def lookup(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, config: KernelConfig = DEFAULT):
    """The backend call: (..., K) codes and weights -> (..., h)."""
    if config == DEFAULT:
        return _flat_lookup(codes, weights, tables)
    return flat_call(lambda c, w, t: _ConfiguredLookup.apply(c, w, t, config))(codes, weights, tables)


# ---------------------------------------------------------------------------------------------------------------
# The whole layer: hash (Eq. 3-10) fused into the gather, and its input gradient fused into one kernel.
# Saves the ~10 elementwise passes over the (N, K*tau) input that `chunk_hash` and its autograd graph cost.


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _chunk_weights(z, tau_mask, INV_T2):
    """z (BLOCK_N, TAU_P2) chunk -> (p, A): p = 1 / prod_j (1 + exp(-2|z_j|/t)) (Eq. 10), A = sum_j |z_j|.

    One exp per element and one division per chunk (the product of tau factors in [1, 2] cannot overflow): the
    hash recomputed by every output tile stays cheap next to the row gather."""
    a = tl.where(tau_mask, tl.abs(z), 0.0)
    q = tl.reduce(tl.where(tau_mask, 1.0 + tl.exp(-a * INV_T2), 1.0), 1, _mul)
    return 1.0 / q, tl.sum(a, axis=1)


@triton.jit
def _layer_forward_kernel(
    x_ptr, tab_ptr, out_ptr, codes_ptr, w_ptr, N, H, R, INV_T2,
    K: tl.constexpr, TAU: tl.constexpr, TAU_P2: tl.constexpr, CODE_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, F64: tl.constexpr,
):
    acc_t = tl.float64 if F64 else tl.float32
    pid_h = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    b = tl.arange(0, TAU_P2)
    mn, mh, mb = n < N, j < H, b < TAU
    m2 = mn[:, None] & mh[None, :]
    # Bit weights 2**(tau-1-b), MSB first as chunk_hash, as integer shifts: a float exp2 may round just below 2**j
    # on a GPU and truncate to the wrong code.
    place = tl.where(mb, tl.full((TAU_P2,), 1, tl.int32) << tl.where(mb, TAU - 1 - b, 0), 0)
    save = mn & ((n * 0 + pid_h) == 0)  # one program per token tile writes the hash for the backward
    acc = tl.zeros((BLOCK_N, BLOCK_H), acc_t)
    for k in range(K):
        z = tl.load(x_ptr + n.to(tl.int64)[:, None] * (K * TAU) + k * TAU + b[None, :],
                    mask=mn[:, None] & mb[None, :], other=0.0).to(acc_t)
        c = tl.sum(tl.where((z >= 0) & mb[None, :], place[None, :], 0), axis=1)
        p, a_sum = _chunk_weights(z, mb[None, :], INV_T2)
        w = p
        if CODE_W:
            w = p * a_sum
        tl.store(codes_ptr + n * K + k, c, mask=save)
        tl.store(w_ptr + n * K + k, w, mask=save)
        rows = tl.load(tab_ptr + (k * R + c.to(tl.int64))[:, None] * H + j[None, :], mask=m2, other=0.0).to(acc_t)
        acc += w[:, None] * rows
    tl.store(out_ptr + n.to(tl.int64)[:, None] * H + j[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _layer_input_grad_kernel(
    x_ptr, part_ptr, gx_ptr, N, INV_T2,
    K: tl.constexpr, TAU: tl.constexpr, TAU_P2: tl.constexpr, CODE_W: tl.constexpr, TILES: tl.constexpr,
    BLOCK_N: tl.constexpr, F64: tl.constexpr,
):
    """dL/dz_j = dL/dw * dw/dz_j (Eq. 12); dL/dw = sum over output tiles of the partial dot products."""
    acc_t = tl.float64 if F64 else tl.float32
    k = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.arange(0, TAU_P2)
    mn, mb = n < N, b < TAU
    m2 = mn[:, None] & mb[None, :]
    gw = tl.zeros((BLOCK_N,), acc_t)
    for t in range(TILES):
        gw += tl.load(part_ptr + (t * K + k) * N + n, mask=mn, other=0.0)
    offs = n.to(tl.int64)[:, None] * (K * TAU) + k * TAU + b[None, :]
    z = tl.load(x_ptr + offs, mask=m2, other=0.0).to(acc_t)
    p, a_sum = _chunk_weights(z, mb[None, :], INV_T2)
    sgn = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))  # d|z|/dz, 0 at 0 as torch.abs
    s = 1.0 / (1.0 + tl.exp(tl.abs(z) * INV_T2))  # sigmoid(-2|z|/t) = dlog p / d|z_j| / (2/t)
    dp = p[:, None] * INV_T2 * s  # dp/d|z_j|
    if CODE_W:
        dw = p[:, None] + a_sum[:, None] * dp  # d(A p)/d|z_j|
    else:
        dw = dp
    tl.store(gx_ptr + offs, (gw[:, None] * sgn * dw).to(gx_ptr.dtype.element_ty), mask=m2)


def _layer_consts(tau: int, temperature: float):
    return dict(TAU=tau, TAU_P2=triton.next_power_of_2(tau)), 2.0 / temperature


def layer_fused(x, tables, tau: int, code_weighting: bool, temperature: float, config: KernelConfig = DEFAULT):
    """x (N, K*tau), tables (K, R, h) -> (y (N, h), codes (N, K) int32, weights (N, K) fp32/fp64)."""
    N = x.shape[0]
    K, R, H = tables.shape
    f64 = _is_f64(x, tables)
    y = torch.empty(N, H, device=x.device, dtype=tables.dtype)
    codes = torch.empty(N, K, device=x.device, dtype=torch.int32)
    w = torch.empty(N, K, device=x.device, dtype=torch.float64 if f64 else torch.float32)
    if N:
        consts, inv_t2 = _layer_consts(tau, temperature)
        bn, bh = config.fwd
        wrap_triton(_layer_forward_kernel)[(triton.cdiv(N, bn), triton.cdiv(H, bh))](
            x, tables, y, codes, w, N, H, R, inv_t2, K=K, CODE_W=code_weighting, BLOCK_N=bn, BLOCK_H=bh, F64=f64,
            **consts,
        )
    return y, codes, w


def layer_input_grad(grad, x, codes, tables, tau: int, code_weighting: bool, temperature: float,
                     config: KernelConfig = DEFAULT) -> torch.Tensor:
    """dL/dx (N, K*tau) of the fused layer (Eq. 12 through the hash weights)."""
    N = x.shape[0]
    K = tables.shape[0]
    f64 = _is_f64(x, tables, grad)
    gx = torch.empty_like(x)
    if N == 0:
        return gx
    part = _grad_weight_parts(grad, codes, tables, f64, config)
    consts, inv_t2 = _layer_consts(tau, temperature)
    bn = config.bwd[0]
    wrap_triton(_layer_input_grad_kernel)[(triton.cdiv(N, bn), K)](
        x, part, gx, N, inv_t2, K=K, CODE_W=code_weighting, TILES=part.shape[0], BLOCK_N=bn, F64=f64, **consts,
    )
    return gx


@triton_op("memoryformer::layer_triton", mutates_args=())
def layer_op(
    x: torch.Tensor, tables: torch.Tensor, tau: int, code_weighting: bool, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`layer_fused` at the default tiles, as a custom op (torch.compile traces it without a graph break)."""
    return layer_fused(x, tables, tau, code_weighting, temperature)


@triton_op("memoryformer::layer_triton_input_grad", mutates_args=())
def _input_grad_op(
    grad: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, tau: int, code_weighting: bool,
    temperature: float,
) -> torch.Tensor:
    return layer_input_grad(grad, x, codes, tables, tau, code_weighting, temperature)


@layer_op.register_fake
def _(x, tables, tau, code_weighting, temperature):
    N, (K, _, H) = x.shape[0], tables.shape
    wdt = torch.float64 if torch.float64 in (x.dtype, tables.dtype) else torch.float32
    y = x.new_empty((N, H), dtype=tables.dtype)
    return y, x.new_empty((N, K), dtype=torch.int32), x.new_empty((N, K), dtype=wdt)


@_input_grad_op.register_fake
def _(grad, x, codes, tables, tau, code_weighting, temperature):
    return torch.empty_like(x)


def _layer_setup(ctx, inputs, output):
    x, tables, tau, code_weighting, temperature = inputs
    _, codes, w = output
    ctx.save_for_backward(x, tables, codes, w)
    ctx.hash_args = (tau, code_weighting, temperature)


def _layer_backward(ctx, grad, _grad_codes, _grad_w):
    x, tables, codes, w = ctx.saved_tensors
    grad = grad.contiguous()
    gx = gt = None
    if ctx.needs_input_grad[0]:
        gx = _input_grad_op(grad, x, codes, tables, *ctx.hash_args)
    if ctx.needs_input_grad[1]:
        _, gt = torch.ops.memoryformer.lookup_triton_backward(grad, codes, w, tables, False, True)
    return gx, gt, None, None, None


layer_op.register_autograd(_layer_backward, setup_context=_layer_setup)


class _ConfiguredLayer(torch.autograd.Function):
    """The fused layer with a non-default `KernelConfig`, eager only (the registered op runs the defaults)."""

    @staticmethod
    def forward(ctx, x, tables, tau, code_weighting, temperature, config):
        y, codes, w = layer_fused(x, tables, tau, code_weighting, temperature, config)
        ctx.save_for_backward(x, tables, codes, w)
        ctx.args = (tau, code_weighting, temperature, config)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, tables, codes, w = ctx.saved_tensors
        tau, code_weighting, temperature, config = ctx.args
        grad = grad.contiguous()
        gx = gt = None
        if ctx.needs_input_grad[0]:
            gx = layer_input_grad(grad, x, codes, tables, tau, code_weighting, temperature, config)
        if ctx.needs_input_grad[1]:
            _, gt = backward(grad, codes, w, tables, False, True, config)
        return gx, gt, None, None, None, None


def layer_forward(x, tables, bias, *, tau: int, weighting: str, temperature: float, scale=None,
                  config: KernelConfig = DEFAULT) -> torch.Tensor:
    """`memory_lookup(*chunk_hash(x, tau, ...), tables, bias)` with the hash inside the gather kernel."""
    if scale is not None:  # int8 inference tables: the unfused path folds the row scales into the weights
        codes, w = chunk_hash(x, tau, weighting=weighting, temperature=temperature)
        y = lookup(codes, w * row_scales(scale, codes), tables, config)
    else:
        lead, h = x.shape[:-1], tables.shape[2]
        args = (x.reshape(-1, x.shape[-1]).contiguous(), tables.contiguous(), tau, weighting == "release",
                float(temperature))
        y = layer_op(*args)[0] if config == DEFAULT else _ConfiguredLayer.apply(*args, config)
        y = y.reshape(*lead, h)
    return y if bias is None else y + bias
