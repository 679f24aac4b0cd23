"""The LM head and token embedding frozen for inference: weight-only int8 (one float32 scale per row), int4 (two
values per byte, one float16 scale per group of values of a row) or bfloat16.

State-dict keys follow the one storage convention of `memoryformer.ops.quant`: `weight` (int8 or bfloat16, the
nn.Linear / nn.Embedding shape; int4: (rows, cols / 2) uint8) and `scale` ((rows,) float32 for int8, (rows, groups)
float16 for int4); a frozen model saves `head.weight`, `head.scale`, `embed.weight`, `embed.scale`. Outputs are
float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memoryformer.config import ROW_DTYPES
from memoryformer.ops import cpu_ext
from memoryformer.ops.int4 import INT4_GROUP, check_group, group_count, int4_embedding, int4_matmul, int4_name, is_int4
from memoryformer.ops.quant import dtype_name, to_storage, torch_dtype

SMALL_M = 8  # rows of x up to which the compiled GEMV runs the head (decode); above, ATen's matmul (prefill, eval)
STORED = ("bfloat16", "int8", "int4")  # what a quantised row module holds (float32 stays nn.Linear / nn.Embedding)


class _QuantizedRows(nn.Module):
    """A (rows, cols) weight stored int8 (one fp32 scale per row, absmax), int4 (one fp16 scale per `group_size`
    values of a row) or bfloat16, as buffers `weight` (+ `scale`)."""

    def __init__(self, rows: int, cols: int, dtype, device, group_size: int | None = INT4_GROUP):
        super().__init__()
        self.stored = torch_dtype(dtype, "dtype", STORED)
        self.group_size = check_group(group_size) if self.stored == torch.int4 else None
        if self.stored == torch.int4:
            weight, scale = torch.empty(rows, cols // 2, dtype=torch.uint8, device=device), torch.empty(
                rows, group_count(cols, self.group_size), dtype=torch.float16, device=device)
        else:
            weight = torch.empty(rows, cols, dtype=self.stored, device=device)
            scale = torch.empty(rows, device=device) if self.stored == torch.int8 else None
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @torch.no_grad()
    def load_weight(self, w: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Set the weight from float (rows, cols) values, or from int8 / int4 rows plus their scales as they are."""
        self.weight, self.scale = to_storage(w, scale, self.stored, self.group_size)

    def dtype_tag(self) -> str:
        """The stored dtype as the safetensors tag names it: "int8", "bfloat16", "int4-g64"."""
        return int4_name(self.group_size) if self.stored == torch.int4 else dtype_name(self.stored)

    @classmethod
    @torch.no_grad()
    def _from(cls, w: torch.Tensor, scale: torch.Tensor | None, dtype, group_size, *shape):
        q = cls(*shape, dtype, device="meta", group_size=group_size)
        q.load_weight(w, scale)
        return q


class QuantizedLinear(_QuantizedRows):
    """`nn.Linear` without bias, weight stored int8 (one fp32 scale per output row, absmax) or bfloat16.

    forward: x (..., in_features) -> (..., out_features) float32 logits of x @ (stored weight)^T, accumulated in
    fp32. Up to `SMALL_M` rows run the compiled GEMV (rows dequantised in registers, every core); more rows
    (prefill, evaluation) run ATen matmuls over blocks of dequantised rows.
    """

    def __init__(self, in_features: int, out_features: int, dtype: str | torch.dtype = "int8", device=None,
                 group_size: int | None = INT4_GROUP):
        super().__init__(out_features, in_features, dtype, device, group_size)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, linear: nn.Module, dtype: str | torch.dtype = "int8",
                   group_size: int | None = INT4_GROUP) -> QuantizedLinear:
        """From an `nn.Linear` without bias (or another `QuantizedLinear`, converted)."""
        if getattr(linear, "bias", None) is not None:
            raise ValueError("linear: QuantizedLinear has no bias (the LM head has none)")
        w, s = rows_of(linear)
        return cls._from(w, s, dtype, group_size, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if is_int4(self.weight):  # no compiled int4 GEMV: blocks of dequantised rows
            return int4_matmul(x2.float(), self.weight, self.scale).reshape(*lead, self.out_features)
        ext = cpu_ext.get() if x2.device.type == "cpu" and x2.shape[0] <= SMALL_M else None
        y = ext.gemv(x2, self.weight, self.scale) if ext is not None else _blocked_matmul(x2.float(), self.weight, self.scale)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype_tag()}"


def _blocked_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, block: int = 4096) -> torch.Tensor:
    """x (M, d) float32 @ (w * scale)^T -> (M, V) float32, dequantising `block` rows of w at a time (no fp32 copy of
    the whole weight)."""
    out = x.new_empty(x.shape[0], w.shape[0])
    for r in range(0, w.shape[0], block):
        torch.mm(x, w[r : r + block].to(x.dtype).T, out=out[:, r : r + block])
        if scale is not None:
            out[:, r : r + block] *= scale[r : r + block]
    return out


class QuantizedEmbedding(_QuantizedRows):
    """`nn.Embedding` stored int8 (one fp32 scale per token row) or bfloat16; forward returns float32 rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str | torch.dtype = "int8", device=None,
                 group_size: int | None = INT4_GROUP):
        super().__init__(num_embeddings, embedding_dim, dtype, device, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_float(cls, emb: nn.Module, dtype: str | torch.dtype = "int8",
                   group_size: int | None = INT4_GROUP) -> QuantizedEmbedding:
        """From an `nn.Embedding` (or another `QuantizedEmbedding`, converted)."""
        w, s = rows_of(emb)
        return cls._from(w, s, dtype, group_size, emb.num_embeddings, emb.embedding_dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (...) ids -> (..., embedding_dim) float32
        if is_int4(self.weight):
            return int4_embedding(idx, self.weight, self.scale)
        rows = F.embedding(idx, self.weight).float()
        return rows if self.scale is None else rows * self.scale[idx, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype_tag()}"


def rows_of(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, scale or None) of a head or embedding, quantised or not."""
    if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
        return m.weight, m.scale
    return m.weight.detach(), None


@torch.no_grad()
def freeze_rows(m: nn.Module, dtype: str | torch.dtype, group_size: int | None = INT4_GROUP) -> nn.Module:
    """The head (nn.Linear / QuantizedLinear) or embedding (nn.Embedding / QuantizedEmbedding) `m` frozen as
    `dtype` ("int8", "int4" with `group_size`, "bfloat16", "float32"): a quantised module, or for float32 the plain
    module (`m` itself when it is one already, else its weights dequantised into a frozen one)."""
    dt = torch_dtype(dtype, "dtype", ROW_DTYPES)
    linear = isinstance(m, (nn.Linear, QuantizedLinear))
    if dt != torch.float32:
        return (QuantizedLinear if linear else QuantizedEmbedding).from_float(m, dt, group_size)
    if isinstance(m, (nn.Linear, nn.Embedding)):
        return m
    return plain_rows(m, to_storage(*rows_of(m), torch.float32)[0])


def plain_rows(like: nn.Module, w: torch.Tensor) -> nn.Module:
    """A frozen float nn.Linear (no bias) / nn.Embedding with the shape of `like` holding `w`."""
    linear = isinstance(like, (nn.Linear, QuantizedLinear))
    shape = (like.in_features, like.out_features) if linear else (like.num_embeddings, like.embedding_dim)
    new = (nn.Linear(*shape, bias=False, device="meta") if linear else nn.Embedding(*shape, device="meta"))
    new.weight = nn.Parameter(w, requires_grad=False)
    return new
