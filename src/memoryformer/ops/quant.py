"""Inference tables: int8 with one scale per row (symmetric), dequantised on gather.

A row r of table k is stored as q[k, r] (int8, |q| <= 127) and scale[k, r] (float32), T[k, r] ~= scale[k, r] * q[k, r].
Because the lookup multiplies each fetched row by a per-token weight anyway, the scale folds into that weight
(`memory_lookup(..., scale=scale)`), so kernels read int8 rows and never a dequantised table.
"""

from __future__ import annotations

import torch


def quantize_rows(tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tables (..., h) float -> (q (..., h) int8, scale (...) float32), round-to-nearest, absmax per row.

    Used for Memory Layer tables (K, R, h) and, with one scale per output row, for the LM head and embedding."""
    t = tables.detach().float()
    scale = t.abs().amax(dim=-1) / 127.0  # (K, R)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale reproduces it
    q = torch.round(t / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_rows` (up to rounding): (K, R, h) in `dtype`."""
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def quantize_rows_into(rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """`quantize_rows` writing into q (..., h) int8 and scale (...) float32, overwriting the float32 `rows` as
    scratch: no temporary the size of the rows (converting a checkpoint chunk by chunk)."""
    s = torch.maximum(rows.amax(dim=-1), rows.amin(dim=-1).neg_()).div_(127.0)
    s = torch.where(s > 0, s, torch.ones_like(s))
    scale.copy_(s)
    q.copy_(rows.div_(s[..., None]).round_().clamp_(-127, 127))
