"""`torch.library` registration shared by the lookup kernels.

Every kernel pair becomes two ops in the `memoryformer` namespace:

* `memoryformer::{name}(codes (N, K), weights (N, K), tables (K, R, h)) -> (N, h)`
* `memoryformer::{name}_backward(grad (N, h), codes, weights, tables, need_weights, need_tables)
  -> (grad_weights (N, K) or empty, grad_tables (K, R, h) or empty)`

with fake (meta) implementations, so `torch.compile` traces through them without graph breaks, and an autograd
formula that calls the backward op. Codes never get a gradient (Eq. 12 treats the hash as constant).

A kernel that can also return the table gradient on the rows hit only (`touched_rows`) gets a third op,
`memoryformer::{name}_touched_rows(grad, codes, weights, tables) -> (rows (U,), values (U, h))`, and its forward op
takes a fourth argument `sparse_grad: bool`: when true, the tables' gradient is a sparse COO tensor of those rows,
as `nn.Embedding(sparse=True)` gives (for optimizers that update only the rows hit, `memoryformer.optim`).
"""

from __future__ import annotations

from typing import Callable

import torch

from memoryformer.ops.reference import result_dtype

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
TouchedRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def define_lookup_op(name: str, forward: Forward, backward: Backward, *, triton: bool = False,
                     touched_rows: TouchedRows | None = None):
    """Register the forward/backward pair as custom ops (`triton_op` when the kernels are Triton) and return the
    forward op, callable as `op(codes, weights, tables)` on 2-D codes/weights (plus `sparse_grad` with
    `touched_rows`: (grad, codes, weights, tables) -> (sorted unique flat row ids k*R + code, their (U, h) sums))."""
    qual = f"memoryformer::{name}"
    define = torch.library.triton_op if triton else torch.library.custom_op

    def fwd(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return forward(codes, weights, tables)

    def fwd_sparse(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor,
                   sparse_grad: bool = False) -> torch.Tensor:
        return forward(codes, weights, tables)

    def bwd(
        grad: torch.Tensor,
        codes: torch.Tensor,
        weights: torch.Tensor,
        tables: torch.Tensor,
        need_weights: bool,
        need_tables: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return backward(grad, codes, weights, tables, need_weights, need_tables)

    fwd_op = define(qual, fwd if touched_rows is None else fwd_sparse, mutates_args=())
    bwd_op = define(f"{qual}_backward", bwd, mutates_args=())
    rows_op = None if touched_rows is None else _define_touched_rows(f"{qual}_touched_rows", touched_rows, define)

    @fwd_op.register_fake
    def _(codes, weights, tables, *sparse_grad):
        return tables.new_empty((codes.shape[0], tables.shape[2]), dtype=result_dtype(weights, tables))

    @bwd_op.register_fake
    def _(grad, codes, weights, tables, need_weights, need_tables):
        gw = torch.empty_like(weights) if need_weights else weights.new_empty((0,))
        gt = torch.empty_like(tables) if need_tables else tables.new_empty((0,))
        return gw, gt

    def setup_context(ctx, inputs, output):
        codes, weights, tables = inputs[:3]
        ctx.sparse_grad = bool(inputs[3]) if len(inputs) > 3 else False
        ctx.save_for_backward(codes, weights, tables)

    def backward_formula(ctx, grad):
        codes, weights, tables = ctx.saved_tensors
        need_w, need_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        extra = (None,) * (rows_op is not None)  # sparse_grad gets no gradient
        if not (need_w or need_t):
            return None, None, None, *extra
        grad = grad.contiguous()
        sparse = ctx.sparse_grad and need_t
        gw = gt = None
        if need_w or not sparse:
            gw, gt = bwd_op(grad, codes, weights, tables, need_w, need_t and not sparse)
        if sparse:
            gt = _sparse_rows_grad(*rows_op(grad, codes, weights, tables), tables)
        return None, gw if need_w else None, gt if need_t else None, *extra

    fwd_op.register_autograd(backward_formula, setup_context=setup_context)
    return fwd_op


def _define_touched_rows(qual: str, touched_rows: TouchedRows, define):
    def rows(grad: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor,
             tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return touched_rows(grad, codes, weights, tables)

    op = define(qual, rows, mutates_args=())

    @op.register_fake
    def _(grad, codes, weights, tables):
        U = torch.library.get_ctx().new_dynamic_size()
        acc = torch.float64 if torch.float64 in (grad.dtype, weights.dtype, tables.dtype) else torch.float32
        return codes.new_empty((U,)), grad.new_empty((U, tables.shape[2]), dtype=acc)

    return op


def _sparse_rows_grad(rows: torch.Tensor, values: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The (K, R, h) sparse COO gradient in the tables' dtype: indices (2, U) = (table k, row), coalesced."""
    R = tables.shape[1]
    return torch.sparse_coo_tensor(torch.stack((rows // R, rows % R)), values.to(tables.dtype), tables.shape,
                                   is_coalesced=True, check_invariants=False)


def flat_call(op) -> Forward:
    """Adapt a 2-D op to the backend signature: (..., K) codes/weights -> (..., h); keyword arguments (sparse_grad)
    go to the op as they are."""

    def fn(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, **kw) -> torch.Tensor:
        K, h = tables.shape[0], tables.shape[2]
        lead = codes.shape[:-1]
        y = op(codes.reshape(-1, K).contiguous(), weights.reshape(-1, K).contiguous(), tables.contiguous(), **kw)
        return y.reshape(*lead, h)

    return fn
