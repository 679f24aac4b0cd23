"""Inference tables: int8 with one scale per row (symmetric), dequantised on gather.

A row r of table k is stored as q[k, r] (int8, |q| <= 127) and scale[k, r] (float32), T[k, r] ~= scale[k, r] * q[k, r].
Because the lookup multiplies each fetched row by a per-token weight anyway, the scale folds into that weight
(`memory_lookup(..., scale=scale)`), so kernels read int8 rows and never a dequantised table.
"""

from __future__ import annotations

import torch


def quantize_rows(tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tables (K, R, h) float -> (q (K, R, h) int8, scale (K, R) float32), round-to-nearest, absmax per row."""
    t = tables.detach().float()
    scale = t.abs().amax(dim=-1) / 127.0  # (K, R)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale reproduces it
    q = torch.round(t / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_rows` (up to rounding): (K, R, h) in `dtype`."""
    return (q.to(torch.float32) * scale[..., None]).to(dtype)
