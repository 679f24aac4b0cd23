"""The Memory Layer (paper §2, Eq. 2-12) and the Memory Block (paper §2.4): drop-in replacements for nn.Linear and
for the FFN. The math is in `memoryformer.ops.reference`; the kernels behind `memoryformer.ops`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from memoryformer.config import (
    BIT_ORDERS,
    DEFAULT_WEIGHTING,
    WEIGHTINGS,
)
from memoryformer.ops import (
    backend_names,
    memory_hash,
    memory_layer,
    memory_lookup,
    pack_tables,
    resolve_backend,
)
from memoryformer.ops.int4 import INT4_GROUP, check_group, group_count, int4_name, is_int4
from memoryformer.ops.quant import to_storage, torch_dtype
from memoryformer.ops.reference import lsb_first


class MemoryLayer(nn.Module):
    """A hash-table replacement for `nn.Linear(in_features, out_features)`.

    The input is cut into K = in_features // tau chunks; chunk k's sign pattern picks one of the 2**tau rows of
    `tables[k]`, and the output is the sum of the K rows, each scaled by a differentiable weight of its chunk.

    Args:
        in_features: input width, a multiple of tau.
        out_features: output width h.
        tau: bits per chunk (rows per table = 2**tau).
        bias: add a learned bias of shape (out_features,).
        weighting: "paper" (default): prod_j sigmoid(2|z_j|/t), Eq. 10 (lower validation PPL at equal tokens:
            benchmarks/results/weighting_evidence.md); "release": ||z||_1 * prod_j sigmoid(2|z_j|/t), as the
            authors' released code.
        temperature: t.
        bit_order: "msb" (default; Fig. 2 and the authors' code): chunk element j is bit tau-1-j of the row index;
            "lsb" (Eq. 4 as printed): element j is bit j. The two only permute each table's rows; pick the one a
            checkpoint was trained with.
        hash_projection: hash a learned projection `proj(x)` (nn.Linear(in, in), LookupFFN style) instead of x
            itself. Off by default: the paper and both released configs hash x directly.
        backend: which kernel runs the gather: "auto" (default: Triton on CUDA, the "cpu" kernels on CPU),
            "reference", "embedding_bag", "cpu", "triton"; see `memoryformer.ops`.
        sparse_grad: give `tables` a sparse COO gradient of the rows hit (as `nn.Embedding(sparse=True)`) where the
            backend offers one ("cpu"); dense elsewhere. For optimizers that update only the rows hit: the optimizer
            setup sets it (`memoryformer.optim.build_optimizer`, `sparse_table_grads`).

    Shapes: input (..., in_features) floating; output (..., out_features) in the tables' dtype.
    Parameters: `tables` (K, 2**tau, out_features), `bias` (out_features,) or None, `proj` (with hash_projection).
    After `freeze("int8")` the tables are frozen int8 and a `scale` (K, 2**tau) buffer holds one scale
    per row; `activation_dtype` then holds the dtype the outputs keep (None while the tables train). Frozen int8
    tables are also kept in the layout the backend's kernel reads (`packed_tables`, made on first use). After
    `freeze("int4")` the tables are (K, 2**tau, out_features / 2) uint8, two values per byte, and `scale`
    (K, 2**tau, groups) float16 holds one scale per `group_size` values of a row (`memoryformer.ops.int4`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tau: int = 8,
        *,
        bias: bool = True,
        weighting: str = DEFAULT_WEIGHTING,
        temperature: float = 1.0,
        bit_order: str = "msb",
        hash_projection: bool = False,
        backend: str = "auto",
        sparse_grad: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not (isinstance(tau, int) and 1 <= tau <= 16):
            raise ValueError(f"tau: expected an integer in [1, 16], got {tau!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if in_features % tau:
            raise ValueError(f"in_features={in_features} is not a multiple of tau={tau} (K = in_features / tau chunks)")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        if bit_order not in BIT_ORDERS:
            raise ValueError(f"bit_order: expected one of {BIT_ORDERS}, got {bit_order!r}")
        if backend not in backend_names():
            raise ValueError(f"backend: expected one of {backend_names()}, got {backend!r}")
        self.in_features, self.out_features, self.tau = in_features, out_features, tau
        self.n_tables = in_features // tau
        self.weighting, self.temperature, self.backend = weighting, float(temperature), backend
        self.bit_order, self.sparse_grad = bit_order, bool(sparse_grad)
        factory = dict(device=device, dtype=dtype)
        self.proj = nn.Linear(in_features, in_features, **factory) if hash_projection else None
        self.tables = nn.Parameter(torch.empty(self.n_tables, 2**tau, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("scale", None)  # (K, 2**tau) float32 row scales of int8 inference tables
        self.group_size: int | None = None  # int4 tables: values per scale (0: the whole row)
        self.packed_tables: torch.Tensor | None = None  # see `_packed`; an attribute, not a buffer: never saved,
        self._packed_of: tuple | None = None  # moved or broadcast; (tables, version, device) it was made from
        self.activation_dtype: torch.dtype | None = None  # set by freeze: the outputs keep this dtype
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, bias_std: float = 0.001) -> None:
        """Tables ~ N(0, std^2), bias ~ N(0, bias_std^2) (the authors' defaults)."""
        nn.init.normal_(self.tables, std=std)
        if self.bias is not None:
            nn.init.normal_(self.bias, std=bias_std)
        if self.proj is not None:  # keeps the input's scale, which the "release" weighting ||z||_1 p(z) sees
            nn.init.normal_(self.proj.weight, std=self.in_features**-0.5)
            nn.init.zeros_(self.proj.bias)

    def hash_input(self, x: torch.Tensor) -> torch.Tensor:
        """What gets chunked and hashed: x, or proj(x), with each chunk reversed for bit_order="lsb"."""
        if self.proj is not None:
            x = self.proj(x)
        return lsb_first(x, self.tau) if self.bit_order == "lsb" else x

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"MemoryLayer expects a floating-point tensor, got {got}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"MemoryLayer expects input (..., {self.in_features}) (last dim = in_features), got shape {tuple(x.shape)}"
            )
        if x.device != self.tables.device:
            raise ValueError(f"input: on {x.device}, but the layer's tables are on {self.tables.device} "
                             "(move one of them with .to(device))")
        if x.dtype == torch.float64 and self.tables.dtype != torch.float64:
            # as nn.Linear refuses mixed dtypes: float64 input would silently be computed at the tables' precision
            raise TypeError(f"input: float64, but the layer's tables are {str(self.tables.dtype).removeprefix('torch.')}"
                            " (cast the input, e.g. x.float(), or the layer, layer.double())")

    def _check_hash(self, x: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor) -> None:
        want = (*x.shape[:-1], self.n_tables)
        if tuple(codes.shape) != want or codes.shape != weights.shape:
            raise ValueError(
                f"hash: expected codes and weights of shape {want} (the input's leading dims, K={self.n_tables}), "
                f"got {tuple(codes.shape)} and {tuple(weights.shape)}"
            )
        if codes.dtype not in (torch.int64, torch.int32) or not weights.is_floating_point():
            raise TypeError(f"hash: expected int64/int32 codes and floating weights, got {codes.dtype} and {weights.dtype}")
        # an out-of-range code would read a row of the next table; on GPUs this check would cost a sync per call
        if codes.device.type == "cpu" and codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < 2**self.tau:
            bad = int(codes.min()) if int(codes.min()) < 0 else int(codes.max())
            raise ValueError(f"hash: code {bad} is outside the {2**self.tau} rows of a table (tau={self.tau})")

    def hash(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (..., K) int64, weights (..., K) float). Share it across layers with the same input and tau."""
        self._check_input(x)
        return memory_hash(self.hash_input(x), self.tables, tau=self.tau, weighting=self.weighting,
                           temperature=self.temperature, backend=self.backend)

    def forward(self, x: torch.Tensor, hash: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if hash is None:
            self._check_input(x)
            y = memory_layer(
                self.hash_input(x), self.tables, self.bias, tau=self.tau, weighting=self.weighting,
                temperature=self.temperature, backend=self.backend, scale=self.scale,
                sparse_grad=self.sparse_grad, packed=self._packed(),
            )
        else:
            codes, weights = hash
            self._check_hash(x, codes, weights)
            y = memory_lookup(codes, weights, self.tables, self.bias, backend=self.backend, scale=self.scale,
                              sparse_grad=self.sparse_grad)
        return y if self.activation_dtype is None else y.to(self.activation_dtype)

    def _packed(self) -> torch.Tensor | None:
        """Frozen int8 tables in the layout the backend's kernel reads (`ops.pack_tables`), made again whenever the
        tables are replaced, modified or moved; None for float or trainable tables."""
        t = self.tables
        if t.is_floating_point() or t.requires_grad or torch.compiler.is_compiling():
            return None
        made = self._packed_of
        if made is None or made[0] is not t or made[1:] != (t._version, t.device):
            self.packed_tables = pack_tables(t, backend=self.backend)
            self._packed_of = (t, t._version, t.device)
        return self.packed_tables

    def active_backend(self) -> str:
        """Name of the backend that runs for the current tables (and grad mode)."""
        return resolve_backend(self.backend, self.tables).name

    @torch.no_grad()
    def freeze(self, dtype: str | torch.dtype = "int8", group_size: int | None = INT4_GROUP) -> MemoryLayer:
        """Freeze the tables for inference as "float32", "bfloat16", "float16", "int8" (one scale per row) or
        "int4" (one float16 scale per `group_size` values of a row; None: per row).

        Outputs keep the dtype the layer produced before (the tables' old dtype), so the rest of the model is
        unchanged. The tables no longer train; state_dict then holds `tables` in the new dtype (and `scale`).
        """
        dt = torch_dtype(dtype)
        act = self.activation_dtype or self.tables.dtype
        stored = to_storage(self.tables.detach(), self.scale, dt, group_size)
        return self.set_frozen(*stored, activation_dtype=act, group_size=group_size if dt == torch.int4 else None)

    def set_frozen(self, tables: torch.Tensor, scale: torch.Tensor | None, activation_dtype: torch.dtype,
                   group_size: int | None = INT4_GROUP) -> MemoryLayer:
        """Install frozen tables (K, 2**tau, h) as they are, with their row `scale` (K, 2**tau) float32 when int8,
        or int4 tables (K, 2**tau, h / 2) uint8 with their `scale` (K, 2**tau, groups) of `group_size` values;
        outputs are cast to `activation_dtype`. What `freeze` and the streaming loader both end with."""
        quantized = tables.dtype in (torch.int8, torch.uint8)
        if quantized and scale is None:
            raise ValueError(f"tables: {'int4' if is_int4(tables) else 'int8'} tables need their scale")
        if is_int4(tables):
            g = check_group(group_size)
            want = (*tables.shape[:-1], group_count(self.out_features, g))
            if 2 * tables.shape[-1] != self.out_features or tuple(scale.shape) != want:
                raise ValueError(f"tables: int4 tables {tuple(tables.shape)} with scale {tuple(scale.shape)} do not "
                                 f"hold rows of {self.out_features} values in groups of {g or 'a whole row'}")
            self.group_size = g
        else:
            self.group_size = None
        self.tables = nn.Parameter(tables, requires_grad=False)
        self.scale = scale if quantized else None
        self.activation_dtype = activation_dtype
        return self

    def tables_name(self) -> str:
        """The frozen tables' dtype as the safetensors tag names it: "int8", "bfloat16", ..., "int4-g64"."""
        return int4_name(self.group_size) if is_int4(self.tables) else str(self.tables.dtype).removeprefix("torch.")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tau={self.tau}, "
            f"K={self.n_tables}, bias={self.bias is not None}, weighting={self.weighting!r}, "
            f"temperature={self.temperature}, backend={self.backend!r}"
            + (", sparse_grad=True" if self.sparse_grad else "")
            + (f", bit_order={self.bit_order!r}" if self.bit_order != "msb" else "")
            + (", hash_projection=True" if self.proj is not None else "")
            + (f", tables={self.tables_name()}" if self.activation_dtype is not None else "")
        )


class MemoryFFN(nn.Module):
    """The paper's Memory Block (§2.4), which replaces the FFN: MemoryLayer(d -> (tau+e)K) -> LayerNorm -> [act] ->
    MemoryLayer(-> d). (`MemoryBlock` is the same class under the paper's name.)

    The second layer hashes chunks of tau + e bits ("expanding bits", e = `expand_bits`), so its tables have
    2**(tau+e) rows: 4x the first layer's for e = 2, mirroring a dense FFN's 4x expansion. The paper uses no
    activation; `activation="gelu"` adds one after the first layer (Table 6).
    """

    def __init__(
        self,
        d_model: int,
        tau: int = 8,
        expand_bits: int = 2,
        *,
        activation: str | None = None,
        bias: bool = True,
        weighting: str = DEFAULT_WEIGHTING,
        temperature: float = 1.0,
        bit_order: str = "msb",
        hash_projection: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if activation not in (None, "gelu"):
            raise ValueError(f"activation: expected None or 'gelu', got {activation!r}")
        kw = dict(bias=bias, weighting=weighting, temperature=temperature, bit_order=bit_order,
                  hash_projection=hash_projection, backend=backend, device=device, dtype=dtype)
        hidden = (tau + expand_bits) * (d_model // tau)
        self.l1 = MemoryLayer(d_model, hidden, tau, **kw)
        self.act = nn.GELU() if activation == "gelu" else nn.Identity()
        self.norm = nn.LayerNorm(hidden, eps=1e-5, device=device, dtype=dtype)  # centres the input of the 2nd hash
        self.l2 = MemoryLayer(hidden, d_model, tau + expand_bits, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self.l2(self.norm(self.act(self.l1(x))))


MemoryBlock = MemoryFFN


def small_init_std(d_model: int) -> float:
    """GPT-NeoX small_init: sqrt(2 / (5 d))."""
    return math.sqrt(2.0 / (5.0 * d_model))
