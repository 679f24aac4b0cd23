"""`torch.library` registration shared by the lookup kernels.

Every kernel pair becomes two ops in the `memoryformer` namespace:

* `memoryformer::{name}(codes (N, K), weights (N, K), tables (K, R, h)) -> (N, h)`
* `memoryformer::{name}_backward(grad (N, h), codes, weights, tables, need_weights, need_tables)
  -> (grad_weights (N, K) or empty, grad_tables (K, R, h) or empty)`

with fake (meta) implementations, so `torch.compile` traces through them without graph breaks, and an autograd
formula that calls the backward op. Codes never get a gradient (Eq. 12 treats the hash as constant).
"""

from __future__ import annotations

from typing import Callable

import torch

from memoryformer.ops.reference import result_dtype

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def define_lookup_op(name: str, forward: Forward, backward: Backward, *, triton: bool = False):
    """Register the forward/backward pair as custom ops (`triton_op` when the kernels are Triton) and return the
    forward op, callable as `op(codes, weights, tables)` on 2-D codes/weights."""
    qual = f"memoryformer::{name}"
    define = torch.library.triton_op if triton else torch.library.custom_op

    def fwd(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
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

    fwd_op = define(qual, fwd, mutates_args=())
    bwd_op = define(f"{qual}_backward", bwd, mutates_args=())

    @fwd_op.register_fake
    def _(codes, weights, tables):
        return tables.new_empty((codes.shape[0], tables.shape[2]), dtype=result_dtype(weights, tables))

    @bwd_op.register_fake
    def _(grad, codes, weights, tables, need_weights, need_tables):
        gw = torch.empty_like(weights) if need_weights else weights.new_empty((0,))
        gt = torch.empty_like(tables) if need_tables else tables.new_empty((0,))
        return gw, gt

    def setup_context(ctx, inputs, output):
        codes, weights, tables = inputs
        ctx.save_for_backward(codes, weights, tables)

    def backward_formula(ctx, grad):
        codes, weights, tables = ctx.saved_tensors
        need_w, need_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_w or need_t):
            return None, None, None
        gw, gt = bwd_op(grad.contiguous(), codes, weights, tables, need_w, need_t)
        return None, gw if need_w else None, gt if need_t else None

    fwd_op.register_autograd(backward_formula, setup_context=setup_context)
    return fwd_op


def flat_call(op) -> Forward:
    """Adapt a 2-D op to the backend signature: (..., K) codes/weights -> (..., h)."""

    def fn(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        K, h = tables.shape[0], tables.shape[2]
        lead = codes.shape[:-1]
        y = op(codes.reshape(-1, K).contiguous(), weights.reshape(-1, K).contiguous(), tables.contiguous())
        return y.reshape(*lead, h)

    return fn
