"""Frozen weights: the dtype vocabulary, int8 with one scale per row (symmetric), and int4 rows with one scale
per group (`memoryformer.ops.int4`), dequantised on read.

One storage convention for every frozen row-major weight (Memory Layer tables, LM head, token embedding): the
module keeps the int8 tensor under its usual name (`tables`, `weight`) and its row scales in a float32 buffer
`scale` of the tensor's shape without the last dim. Row r is stored as q[r] (int8, |q| <= 127) and scale[r],
W[r] ~= scale[r] * q[r]. Because a Memory Layer lookup multiplies each fetched row by a per-token weight anyway, the
scale folds into that weight (`memory_lookup(..., scale=scale)`), so kernels read int8 rows and never a dequantised
table.

"int4" (`torch.int4`, a name only: the storage is uint8 with two values per byte) keeps the same convention with
group-wise scales: `tables` / `weight` packed, `scale` (..., ceil(h / G)) float16 (`memoryformer.ops.int4`).
"""

from __future__ import annotations

import torch

from memoryformer.config import DTYPES
from memoryformer.ops.int4 import INT4_GROUP, dequantize_int4, group_count, is_int4, quantize_int4


def torch_dtype(name: str | torch.dtype, what: str = "dtype", allowed: tuple[str, ...] = DTYPES) -> torch.dtype:
    """The torch dtype of `name` (one of `allowed`, `memoryformer.config.DTYPES` by default; a torch.dtype of those
    passes through), else a ValueError naming `what` and the choices."""
    key = dtype_name(name) if isinstance(name, torch.dtype) else name
    if key not in allowed:
        raise ValueError(f"{what}: expected one of {list(allowed)}, got {name!r}")
    return getattr(torch, key)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the vocabulary's name of a torch dtype (uint8, packed int4 storage: "int4")."""
    return "int4" if dtype == torch.uint8 else str(dtype).removeprefix("torch.")


def quantize_rows(tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tables (..., h) float -> (q (..., h) int8, scale (...) float32), round-to-nearest, absmax per row."""
    t = tables.detach().float()
    scale = t.abs().amax(dim=-1) / 127.0  # (...)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale reproduces it
    q = torch.round(t / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_rows` (up to rounding): (..., h) in `dtype`."""
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def quantize_rows_into(rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """`quantize_rows` writing into q (..., h) int8 and scale (...) float32, overwriting the float32 `rows` as
    scratch: no temporary the size of the rows (converting a checkpoint chunk by chunk)."""
    s = torch.maximum(rows.amax(dim=-1), rows.amin(dim=-1).neg_()).div_(127.0)
    s = torch.where(s > 0, s, torch.ones_like(s))
    scale.copy_(s)
    q.copy_(rows.div_(s[..., None]).round_().clamp_(-127, 127))


@torch.no_grad()
def to_storage(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, group: int | None = INT4_GROUP):
    """(stored rows, scale or None) of weight `w` (float rows, or int8 / int4 rows with their `scale`) frozen as
    `dtype`: quantised rows are kept as they are when `dtype` is theirs (int4: with `group`'s count of groups),
    else dequantised first; float rows are quantised (`quantize_rows`, `quantize_int4` with `group`) or cast. The
    one conversion behind every freeze (`memoryformer.freeze`, the loader)."""
    if w.dtype in (torch.int8, torch.uint8):
        if scale is None:
            raise ValueError(f"weight: {dtype_name(w.dtype)} rows need their scale")
        if w.dtype == torch.int8 and dtype == torch.int8:
            return w, scale.float()
        if is_int4(w) and dtype == torch.int4 and scale.shape[-1] == group_count(2 * w.shape[-1], group):
            return w, scale
        w = dequantize_int4(w, scale) if is_int4(w) else dequantize_rows(w, scale)
    if dtype == torch.int8:
        return quantize_rows(w)
    if dtype == torch.int4:
        return quantize_int4(w, group)
    return w.detach().to(dtype), None
