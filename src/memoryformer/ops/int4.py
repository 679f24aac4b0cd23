"""Four-bit weight-only rows: two values per byte, one float16 scale per group of G consecutive values of a row.

Storage (the convention of `memoryformer.ops.quant`, with group-wise scales): the module keeps the packed uint8
tensor under its usual name (`tables` (K, R, h/2), `weight` (rows, cols/2)) and the scales in its `scale` buffer,
float16 (..., ceil(h/G)). Value 2j of a row is the low nibble of byte j, value 2j+1 the high one; a nibble holds
q + 8 for q in [-7, 7]. Symmetric absmax: scale = absmax(group) / 7, q = round(x / scale), so 0 and the group's
largest magnitude are exact and every value is within scale / 2 of x. The code -8 is left unused: with [-8, 7]
and scale = absmax / 8 the group's largest positive value would round to 7 / 8 of itself (an error of a whole
step), with scale = absmax / 7 the range would be lopsided for nothing. The scale is rounded up to the next
float16 (never down), so no value leaves [-7, 7] and the bound holds for the stored scale as it is.

G is a power of two (or the whole row: one group); a row whose width is not a multiple of G ends in a shorter
group. Since G is a power of two, a row's width and its count of groups tell G (`group_of`), so kernels need no
other argument. Rows must have an even width (two values per byte).

Everything here is vectorised PyTorch: a lookup gathers the K packed rows of each token, unpacks and scales them
into float32 (float64 for float64 weights) and sums them; the head multiplies block by block; nothing ever holds a
dequantised copy of a whole table or weight.
"""

from __future__ import annotations

import torch

# G, the values sharing one scale, chosen by measurement (benchmarks/quantization.py on a micro checkpoint trained
# for 0.5 M tokens, 65,536 validation tokens; benchmarks/results/quantization_int4_micro.md): val-PPL drift of int4
# tables against fp32 and the micro tables' bytes (fp32 66.0 MiB), absmax rounding:
#   G=32 +0.353 % 9.28 MiB | G=64 +0.314 % 8.78 MiB | G=128 +0.373 % 8.53 MiB | whole row +0.384 % 8.44 MiB
# All four are well inside the 2 % target and within 0.07 % of each other on this lightly trained model; G=64 has
# the least drift, costs 4 % more bytes than one scale per row (4.25 bits per value) and keeps one outlier from
# setting the step of a whole row, whose spread grows as tables train.
INT4_GROUP = 64
QMAX = 7  # values in [-7, 7]: symmetric (see the module docstring)
_CHUNK_ELEMS = 1 << 21  # dequantised values per step of a lookup or a head block (8 MB in float32)


def is_int4(t: torch.Tensor | None) -> bool:
    """Is `t` a packed int4 tensor (uint8 storage)?"""
    return t is not None and t.dtype == torch.uint8


def check_group(group: int | None) -> int:
    """`group` as stored: a power of two >= 2, or 0 for the whole row (None or 0 given), else a ValueError."""
    if group is None or group == 0:
        return 0
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or group & (group - 1):
        raise ValueError(f"group_size: expected a power of two >= 2 (or None: the whole row), got {group!r}")
    return group


def group_count(h: int, group: int | None) -> int:
    """Groups of a row of `h` values: ceil(h / G); one for the whole row."""
    g = check_group(group)
    return 1 if g == 0 or g >= h else -(-h // g)


def group_of(h: int, n: int) -> int:
    """G of a row of `h` values stored with `n` scales: the power of two with ceil(h / G) == n (h for one group)."""
    if n == 1:
        return h
    g = 1 << max(1, (-(-h // n) - 1).bit_length()) if n > 1 else 0
    if not g or -(-h // g) != n:
        raise ValueError(f"scale: {n} groups cannot cover rows of {h} int4 values with a power-of-two group")
    return g


def int4_name(group: int | None) -> str:
    """The dtype tag of int4 rows with group size `group` in the safetensors metadata: "int4-g64", "int4-row"."""
    g = check_group(group)
    return f"int4-g{g}" if g else "int4-row"


def parse_int4_name(name: str) -> int | None:
    """The group size of an `int4_name` tag (0: the whole row), or None when `name` is no int4 tag."""
    if name == "int4-row":
        return 0
    if name.startswith("int4-g") and name[6:].isdigit():
        try:
            return check_group(int(name[6:]))
        except ValueError:
            return None
    return None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (..., h) integers in [-8, 7], h even -> (..., h / 2) uint8: value 2j in the low nibble of byte j."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 rows: expected an even width (two values per byte), got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (..., w) uint8 -> (..., 2w) int8."""
    lo = (p & 15).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _grouped(t: torch.Tensor, g: int) -> torch.Tensor:
    """(..., h) -> (..., n, g) with the last group zero-padded (zeros change no absmax and round to zero)."""
    h = t.shape[-1]
    n = -(-h // g)
    if n * g != h:
        t = torch.nn.functional.pad(t, (0, n * g - h))
    return t.unflatten(-1, (n, g))


def _scales(absmax: torch.Tensor) -> torch.Tensor:
    """float16 scales >= absmax / QMAX (rounded up); 1 for an all-zero group, which any scale reproduces."""
    s32 = absmax / QMAX
    s16 = s32.to(torch.float16)
    if not bool(torch.isfinite(s16).all()):
        raise ValueError(f"int4 rows: a group's largest magnitude {float(absmax.max()):.4g} exceeds what float16 "
                         "scales hold")
    s16 = torch.where(s16.float() < s32, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return torch.where(absmax > 0, s16, torch.ones_like(s16))


def quantize_int4(t: torch.Tensor, group: int | None = INT4_GROUP, clip: tuple[float, ...] = ()) -> tuple:
    """t (..., h) float -> (packed (..., h / 2) uint8, scale (..., ceil(h / G)) float16), absmax per group.

    clip: candidate ratios c < 1 of a clipped scale c * absmax / 7 (values beyond clamp to +-7); each group keeps
    the candidate (1 included) with the least squared error. Empty (default): plain absmax, every value within
    scale / 2 of t.
    """
    t = t.detach().float()
    h = t.shape[-1]
    g = check_group(group) or h
    g = min(g, h)
    x = _grouped(t, g)  # (..., n, g)
    absmax = x.abs().amax(-1)
    scale = _scales(absmax)
    if clip:
        scale = _search_clip(x, absmax, scale, clip)
    q = torch.round(x / scale.float()[..., None]).clamp_(-QMAX, QMAX).flatten(-2)[..., :h]
    return pack_int4(q), scale


def _search_clip(x, absmax, scale, clip) -> torch.Tensor:
    """Per group, the scale among `scale` and c * absmax / 7 (c in clip) with the least squared error."""
    def err(s):
        sf = s.float()[..., None]
        return ((torch.round(x / sf).clamp_(-QMAX, QMAX) * sf - x) ** 2).sum(-1)

    best, best_err = scale, err(scale)
    for c in clip:
        cand = torch.where(absmax > 0, _scales(absmax * c), scale)
        e = err(cand)
        best = torch.where(e < best_err, cand, best)
        best_err = torch.minimum(e, best_err)
    return best


def dequantize_int4(p: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed rows (..., w) uint8 + scale (..., n) -> (..., 2w) in `dtype` (the products are exact in float32)."""
    h, n = 2 * p.shape[-1], scale.shape[-1]
    g = group_of(h, n)
    v = unpack_int4(p).to(dtype)
    s = scale.to(dtype)
    full = (h // g) * g
    if full == h:
        return (v.unflatten(-1, (n, g)) * s[..., None]).flatten(-2)
    if full:
        v[..., :full].unflatten(-1, (n - 1, g)).mul_(s[..., : n - 1, None])
    v[..., full:].mul_(s[..., n - 1 :])
    return v


def int4_lookup(codes: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eq. 11 over int4 tables: codes (..., K), weights (..., K), tables (K, R, h / 2) uint8, scale (K, R, n) ->
    (..., h) in the weights' dtype, summed in float32 (float64 for float64 weights), a chunk of tokens at a time."""
    K, R, w = tables.shape
    h = 2 * w
    acc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    c, wt = codes.reshape(-1, K), weights.reshape(-1, K).to(acc)
    flat, fs = tables.reshape(K * R, w), scale.reshape(K * R, scale.shape[-1])
    start = torch.arange(0, K * R, R, device=codes.device, dtype=c.dtype)
    out = torch.empty(c.shape[0], h, dtype=acc, device=codes.device)
    step = max(1, _CHUNK_ELEMS // (K * h))
    for a in range(0, c.shape[0], step):  # token chunks: the dequantised rows of one chunk stay in cache
        idx = (c[a : a + step] + start).reshape(-1)
        rows = dequantize_int4(flat.index_select(0, idx), fs.index_select(0, idx), acc).view(-1, K, h)
        out[a : a + step] = torch.bmm(wt[a : a + step, None, :], rows)[:, 0]
    return out.to(weights.dtype).reshape(*codes.shape[:-1], h)


def int4_matmul(x: torch.Tensor, p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, d) float @ dequantised(p, scale)^T -> (M, V) in x's dtype: rows of the weight dequantised a block at a
    time (never a float copy of the whole weight)."""
    out = x.new_empty(x.shape[0], p.shape[0])
    block = max(1, _CHUNK_ELEMS // (2 * p.shape[1]))
    for r in range(0, p.shape[0], block):
        torch.mm(x, dequantize_int4(p[r : r + block], scale[r : r + block], x.dtype).T, out=out[:, r : r + block])
    return out


def int4_embedding(idx: torch.Tensor, p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (...) of int4 rows (V, d / 2) -> (..., d) float32, only the rows looked up unpacked."""
    return dequantize_int4(p[idx], scale[idx])


__all__ = ["INT4_GROUP", "QMAX", "check_group", "dequantize_int4", "group_count", "group_of", "int4_embedding",
           "int4_lookup", "int4_matmul", "int4_name", "is_int4", "pack_int4", "parse_int4_name", "quantize_int4",
           "unpack_int4"]
