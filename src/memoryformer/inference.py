"""CPU inference: quantised head and embedding, a compiled decode engine with a static KV cache, small loading.

    import memoryformer as mf
    from memoryformer.inference import DecodeEngine, load_for_inference

    model = load_for_inference("runs/small/final", tables="int8", head="int8")   # never holds the fp32 model
    engine = DecodeEngine(model)                                                 # batch 1, cache of max_seq_len
    logits = engine.prefill(prompt_ids)          # (B, T) -> (B, V) logits of the last prompt token
    logits = engine.step(logits.argmax(-1))      # (B,) -> (B, V), one token, K/V written into the cache
    out = engine.generate(prompt_ids, 128)       # greedy: (B, T + 128)

- `QuantizedLinear` / `QuantizedEmbedding`: weight-only int8 with one fp32 scale per output row (head) or per
  token row (embedding), or plain bfloat16. State-dict keys: `weight` (int8 or bfloat16, the nn.Linear / nn.Embedding
  shape) and, for int8, `scale` (rows,) float32; so a model after `quantize_model` saves `head.weight`, `head.scale`,
  `embed.weight`, `embed.scale`. Logits come out in float32.
- `DecodeEngine`: the whole decode step of a MemoryFormer (embedding, every block, final norm, head) in one C++ call
  (`ops/csrc/engine.cpp`) over a preallocated cache (layer, batch, head, max_seq_len, head_dim). The eager model
  stays the reference: the engine reads the same tensors (tables moved to huge pages in place) and matches
  `model(idx)[0]` (tests/test_inference.py).
- `to_inference(model, "int8")`: tables, head and embedding frozen in place (`memoryformer.to_inference`).
- `load_for_inference`: build the inference model tensor by tensor from a `save_model` checkpoint, converting each
  tensor in chunks, so the fp32 model is never in memory (`memoryformer.load(path, tables="int8")` calls it, and
  `save_model` writes its result as it is). `random_inference_model` does the same from random values (benchmarks).
- `generate()` decodes through a cached `DecodeEngine` (`engine_for`) when the model is frozen for inference and
  `DecodeEngine.supports(model)`.
"""

from __future__ import annotations

import logging
import math
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from memoryformer.config import CONFIG_FILE as CONFIG
from memoryformer.config import HEAD_KEY, INFERENCE_DTYPES, TABLES_KEY, MemoryFormerError, ModelConfig  # noqa: F401 (HEAD_KEY: re-exported)
from memoryformer.config import WEIGHTS_FILE as WEIGHTS
from memoryformer.integrity import check_finite
from memoryformer.ops import cpu_ext
from memoryformer.ops.quant import dequantize_rows, quantize_rows, quantize_rows_into

log = logging.getLogger("memoryformer")

PRECISIONS = {name: getattr(torch, name) for name in INFERENCE_DTYPES}
SMALL_M = 8  # rows of x up to which the compiled GEMV runs the head (decode); above, ATen's matmul (prefill, eval)


def _precision(name, what: str) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in PRECISIONS.values():
        return name
    if name not in PRECISIONS:
        raise ValueError(f"{what}: expected one of {list(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_tables_tag(tag: str, file) -> tuple[str, torch.dtype]:
    """(table dtype name, activation dtype) of a TABLES_KEY tag such as "int8/float32", else one line naming file."""
    tables, _, act = tag.partition("/")
    act_dtype = getattr(torch, act, None)
    if tables not in PRECISIONS or not isinstance(act_dtype, torch.dtype):
        raise MemoryFormerError(f"{file}: unknown {TABLES_KEY} {tag!r} (expected '<{'|'.join(PRECISIONS)}>/<dtype>')")
    return tables, act_dtype


# ---------------------------------------------------------------------------------------------------------------
# Quantised head and embedding


class _QuantizedRows(nn.Module):
    """A (rows, cols) weight stored int8 (one fp32 scale per row, absmax) or bfloat16, as buffers `weight` (+ `scale`)."""

    def __init__(self, rows: int, cols: int, dtype, device, what: str):
        super().__init__()
        dt = _precision(dtype, "dtype")
        if dt not in (torch.int8, torch.bfloat16):
            raise ValueError(f"dtype: {what} stores int8 or bfloat16, got {_dtype_name(dt)!r}")
        self.register_buffer("weight", torch.empty(rows, cols, dtype=dt, device=device))
        self.register_buffer("scale", torch.empty(rows, device=device) if dt == torch.int8 else None)

    @torch.no_grad()
    def load_weight(self, w: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Set the weight from float (rows, cols) values, or from int8 rows plus their scales as they are."""
        self.weight, self.scale = _rows_to(w, scale, self.weight.dtype)

    @classmethod
    @torch.no_grad()
    def _from(cls, w: torch.Tensor, dtype, *shape) -> "_QuantizedRows":
        q = cls(*shape, dtype, device="meta")
        q.load_weight(w)
        return q


class QuantizedLinear(_QuantizedRows):
    """`nn.Linear` without bias, weight stored int8 (one fp32 scale per output row, absmax) or bfloat16.

    forward: x (..., in_features) -> (..., out_features) float32 logits of x @ (stored weight)^T, accumulated in
    fp32. Up to `SMALL_M` rows run the compiled GEMV (rows dequantised in registers, both cores); more rows (prefill,
    evaluation) run ATen matmuls over blocks of dequantised rows.
    """

    def __init__(self, in_features: int, out_features: int, dtype: str | torch.dtype = "int8", device=None):
        super().__init__(out_features, in_features, dtype, device, "QuantizedLinear")
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, linear: nn.Linear, dtype: str | torch.dtype = "int8") -> QuantizedLinear:
        if linear.bias is not None:
            raise ValueError("linear: QuantizedLinear has no bias (the LM head has none)")
        return cls._from(linear.weight, dtype, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        ext = cpu_ext.get() if x2.device.type == "cpu" and x2.shape[0] <= SMALL_M else None
        y = ext.gemv(x2, self.weight, self.scale) if ext is not None else _blocked_matmul(x2.float(), self.weight, self.scale)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={_dtype_name(self.weight.dtype)}"


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

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str | torch.dtype = "int8", device=None):
        super().__init__(num_embeddings, embedding_dim, dtype, device, "QuantizedEmbedding")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_float(cls, emb: nn.Embedding, dtype: str | torch.dtype = "int8") -> QuantizedEmbedding:
        return cls._from(emb.weight, dtype, emb.num_embeddings, emb.embedding_dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (...) ids -> (..., embedding_dim) float32
        rows = F.embedding(idx, self.weight).float()
        return rows if self.scale is None else rows * self.scale[idx, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={_dtype_name(self.weight.dtype)}"


def _rows_to(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype):
    """(rows, scale or None) in `dtype` from float rows or from int8 rows with their scale."""
    if w.dtype == torch.int8:
        if dtype == torch.int8:
            return w, scale.float()
        w = dequantize_rows(w, scale)
    if dtype == torch.int8:
        return quantize_rows(w)
    return w.detach().to(dtype), None


@torch.no_grad()
def quantize_model(model: nn.Module, dtype: str | torch.dtype = "int8", tables: str | torch.dtype | None = None) -> nn.Module:
    """Convert the LM head and the token embedding to `QuantizedLinear` / `QuantizedEmbedding` ("int8" or
    "bfloat16"), in place; `tables` also freezes the Memory Layer tables (`MemoryLayer.to_inference`)."""
    dt = _precision(dtype, "dtype")
    if isinstance(model.head, nn.Linear):
        model.head = QuantizedLinear.from_float(model.head, dt)
    if isinstance(model.embed, nn.Embedding):
        model.embed = QuantizedEmbedding.from_float(model.embed, dt)
    if tables is not None:
        from memoryformer.layers import to_inference

        to_inference(model, tables)
    return model


def default_head(tables: str | torch.dtype | None) -> str:
    """The head/embedding precision that goes with `tables`: int8 with int8, bfloat16 with bfloat16, else float32."""
    name = _dtype_name(tables) if isinstance(tables, torch.dtype) else tables
    return name if name in ("int8", "bfloat16") else "float32"


@torch.no_grad()
def to_inference(model: nn.Module, dtype: str | torch.dtype = "int8", *, head: str | None = None) -> nn.Module:
    """Freeze `model` for inference, in place: the Memory Layer tables to `dtype` ("int8" with one scale per row,
    "bfloat16", "float16", "float32"; `MemoryLayer.to_inference`) and the LM head and token embedding to `head`
    (default `default_head(dtype)`: int8 with int8 tables, bfloat16 with bfloat16, else left float32). A dense
    model has no tables: only its head and embedding change."""
    from memoryformer.layers import MemoryLayer
    from memoryformer.layers import to_inference as tables_to_inference

    _precision(dtype, "tables")
    head = default_head(dtype) if head is None else head
    if _precision(head, "head") == torch.float16:
        raise ValueError("head: expected 'int8', 'bfloat16' or 'float32', got 'float16'")
    if any(isinstance(m, MemoryLayer) for m in model.modules()):
        tables_to_inference(model, dtype)
    if _precision(head, "head") in (torch.int8, torch.bfloat16):
        quantize_model(model, head)
    return model


def quantized_parts(model: nn.Module) -> str | None:
    """"<head dtype>/<embedding dtype>" when the head or the embedding is quantised (`to_inference`), else None."""
    if isinstance(model.head, QuantizedLinear) or isinstance(model.embed, QuantizedEmbedding):
        return f"{_dtype_name(_rows_of(model.head)[0].dtype)}/{_dtype_name(_rows_of(model.embed)[0].dtype)}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Huge pages


def to_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor `t` on transparent huge pages (2 MB-aligned, MADV_HUGEPAGE); `t` itself if the compiled
    kernels are unavailable. Random table rows then cost one TLB entry per 2 MB instead of one per 4 KB."""
    ext = cpu_ext.get()
    if ext is None or t.device.type != "cpu":
        return t
    out = ext.huge_empty(list(t.shape), t.dtype)
    out.copy_(t)
    return out


@torch.no_grad()
def tables_to_huge_pages(model: nn.Module) -> nn.Module:
    """Move every Memory Layer's tables onto huge pages, in place (the model and any engine share them)."""
    from memoryformer.layers import MemoryLayer

    for m in model.modules():
        if isinstance(m, MemoryLayer) and m.tables.device.type == "cpu" and not getattr(m.tables, "_mf_huge", False):
            p = nn.Parameter(to_huge_pages(m.tables.detach()), requires_grad=m.tables.requires_grad)
            p._mf_huge = True
            m.tables = p
    return model


# ---------------------------------------------------------------------------------------------------------------
# The decode engine


class DecodeEngine:
    """Batch-`batch_size` decoding of a MemoryFormer with a static KV cache, one C++ call per step.

    Args:
        model: a `memoryformer.MemoryFormer` on CPU: fp32 / bf16 / fp16 / int8 tables (`to_inference`), an fp32,
            bf16 or int8 head and embedding (`quantize_model`); no hash projection.
        batch_size: rows decoded together (each its own hash and cache; all at the same position).
        max_seq_len: cache length (default: the model's). Positions must stay below it.
        kv_dtype: cache precision, torch.float32 or torch.bfloat16; default float32 for fp32 tables, else bfloat16
            (half the bytes attention reads per token at long contexts).
        threads: threads of the compiled kernels (default: torch's; see `ops.cpu_ext.threads`).
        huge_pages: move the tables onto transparent huge pages (in place, shared with the model).

    `prefill(ids (B, T))` resets the cache and returns the logits of the last token (B, V); `step(ids (B,))`
    appends one token and returns its logits; `append(ids (B, T))` appends several; `reset()` empties the cache.
    Logits are float32.
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 1, max_seq_len: int | None = None,
                 kv_dtype: torch.dtype | None = None, threads: int | None = None, huge_pages: bool = True):
        reason = self.why_not(model)
        if reason:
            raise MemoryFormerError(f"DecodeEngine: {reason}")
        ext = cpu_ext.get()
        if ext is None:
            raise MemoryFormerError(f"DecodeEngine: the compiled CPU kernels are unavailable ({cpu_ext.why_not() or 'build failed'})")
        cfg: ModelConfig = model.config
        S = cfg.max_seq_len if max_seq_len is None else int(max_seq_len)
        if not 1 <= S <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len: expected 1..{cfg.max_seq_len} (the model's rotary tables), got {max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if threads is not None:
            cpu_ext.threads(threads)
        if huge_pages:
            tables_to_huge_pages(model)
        blocks = model.blocks
        table_dtype = blocks[0].attn.qkv.tables.dtype
        kv = kv_dtype or (torch.float32 if table_dtype == torch.float32 else torch.bfloat16)
        if kv not in (torch.float32, torch.bfloat16):
            raise ValueError(f"kv_dtype: expected torch.float32 or torch.bfloat16, got {kv}")
        tensors = []
        for b in blocks:
            tensors += [b.norm1.weight, *_layer_tensors(b.attn.qkv), b.norm2.weight, *_layer_tensors(b.mlp.l1),
                        b.mlp.norm.weight, b.mlp.norm.bias, *_layer_tensors(b.mlp.l2)]
        tensors = [None if t is None else t.detach() for t in tensors]
        embed_w, embed_s = _rows_of(model.embed)
        head_w, head_s = _rows_of(model.head)
        rot = model.rotary
        dims = [cfg.n_layer, cfg.d_model, cfg.n_head, cfg.rotary_dims, S, batch_size, cfg.vocab_size, cfg.tau,
                cfg.tau + cfg.expand_bits, cfg.block_hidden]
        reals = [cfg.temperature, _eps(blocks[0].norm1), blocks[0].mlp.norm.eps]
        flags = [cfg.weighting == "release", cfg.bit_order == "msb", cfg.block_activation == "gelu"]
        cos = rot.cos if cfg.rotary_dims else torch.zeros(0, 0)
        sin = rot.sin if cfg.rotary_dims else torch.zeros(0, 0)
        # a weak reference: `engine_for` keeps engines in a WeakKeyDictionary keyed by their model, which a strong one
        # would keep alive for ever (the compiled engine holds the tensors it reads itself)
        self._model = weakref.ref(model)
        self.config, self.batch_size, self.max_seq_len, self.kv_dtype = cfg, batch_size, S, kv
        self._engine = ext.Engine(dims, reals, flags, kv, embed_w, embed_s, head_w, head_s,
                                  model.norm.weight.detach(), cos, sin, tensors)

    @property
    def model(self) -> nn.Module | None:
        """The model this engine reads (None once it has been freed)."""
        return self._model()

    @staticmethod
    def why_not(model: nn.Module) -> str | None:
        """Why `model` cannot run in the engine, or None."""
        from memoryformer.model import MemoryFormer

        if not isinstance(model, MemoryFormer):
            return f"expected a memoryformer.MemoryFormer, got {type(model).__name__}"
        cfg = model.config
        if cfg.hash_projection:
            return "hash_projection=True is not supported (the eager model runs it)"
        if any(p.device.type != "cpu" for p in model.parameters()):
            return "the model must be on the CPU"
        for m in (model.embed, model.head):
            if not isinstance(m, (nn.Embedding, nn.Linear, QuantizedEmbedding, QuantizedLinear)):
                return f"unsupported {type(m).__name__} as embedding or head"
        if isinstance(model.head, nn.Linear) and model.head.bias is not None:
            return "a head with a bias is not supported"
        return None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return cls.why_not(model) is None and cpu_ext.get() is not None

    @property
    def pos(self) -> int:
        """Tokens in the cache (the position the next token gets)."""
        return self._engine.pos()

    def reset(self) -> None:
        self._engine.set_pos(0)

    def _ids(self, ids: torch.Tensor, ndim: int) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.ndim != ndim:
            shape = "(B,)" if ndim == 1 else "(B, T)"
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids: expected a {shape} integer tensor of token ids, got {got}")
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"ids: batch of {ids.shape[0]} rows, the engine was built for batch_size={self.batch_size}")
        n = 1 if ndim == 1 else ids.shape[1]
        if self.pos + n > self.max_seq_len:
            raise ValueError(f"max_seq_len: {self.pos + n} positions exceed the engine's cache of {self.max_seq_len}")
        return ids.cpu()

    def append(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) after the cached tokens -> logits (B, V) of the last one."""
        ids = self._ids(ids, 2)
        return self._engine.forward(ids)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Empty the cache, then `append(ids)`: (B, T) prompt -> (B, V) logits of its last token."""
        self.reset()
        return self.append(ids)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B,) -> logits (B, V) of that token, which joins the cache."""
        return self._engine.forward(self._ids(ids, 1)[:, None])

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: (B, T) -> (B, T + max_new_tokens)."""
        out = [ids]
        logits = self.prefill(ids)
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        return torch.cat(out, dim=1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The engine's LM head on final-norm hidden states (M, d) -> (M, V) float32."""
        return self._engine.head(hidden)

    def profile(self, enabled: bool = True) -> None:
        """Start (and zero) or stop per-phase timing of the steps; read it with `timings()`."""
        self._engine.set_option("profile", int(enabled))

    def timings(self) -> dict[str, float]:
        """Seconds spent per phase since `profile()`: embed, norms_residuals, hash, gather_qkv, attention (rotary,
        cache write and softmax attention), gather_block_l1, gather_block_l2, head."""
        return dict(self._engine.profile())

    def cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The static (keys, values), each (layer, batch, head, max_seq_len, head_dim), rotary applied."""
        return self._engine.kcache(), self._engine.vcache()


_ENGINES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def frozen(model: nn.Module) -> bool:
    """Is `model` frozen for inference (tables by `to_inference`, or a quantised head/embedding)?"""
    from memoryformer.layers import MemoryLayer

    return quantized_parts(model) is not None or any(
        isinstance(m, MemoryLayer) and m.activation_dtype is not None for m in model.modules())


def engine_for(model: nn.Module, batch_size: int = 1) -> DecodeEngine | None:
    """The `DecodeEngine` of `model` for `batch_size` rows, built on first use and kept while the model's tensors
    are the same ones; None when the engine cannot run this model (see `DecodeEngine.why_not`)."""
    if not DecodeEngine.supports(model):
        return None
    key = [t.data_ptr() for t in (*model.parameters(), *model.buffers())]
    hit = _ENGINES.get(model)
    if hit is not None and hit[0] == key and hit[1].batch_size == batch_size:
        return hit[1]
    engine = DecodeEngine(model, batch_size=batch_size)  # may move the tables onto huge pages: key them after
    _ENGINES[model] = ([t.data_ptr() for t in (*model.parameters(), *model.buffers())], engine)
    return engine


def _layer_tensors(m) -> list:
    return [m.tables, m.table_scale, m.bias]


def _rows_of(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
        return m.weight, m.scale
    return m.weight.detach(), None


def _eps(norm: nn.Module) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------------------------
# Building an inference model tensor by tensor: from a checkpoint file, or from random values (benchmarks)

CHUNK_BYTES = 16 << 20  # converted per read: the fp32 rows in flight at once
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8}


class _FileSource:
    """Rows of the tensors of one safetensors file, read a chunk at a time.

    The file is opened (memory-mapped) anew for each chunk, so the pages a chunk touched leave the process's
    resident set when it is closed: the peak is the model being built plus one chunk, not the file.
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(path, framework="pt") as f:
                self.meta = f.metadata() or {}
                self.info = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise MemoryFormerError(f"{path}: unreadable safetensors file ({e})") from None

    def has(self, name: str) -> bool:
        return name in self.info

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.info:
            raise MemoryFormerError(f"{self.path}: missing tensor {name!r} (the file does not match {CONFIG})")
        return self.info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        self.shape(name)
        code = self.info[name][1]
        if code not in _SAFETENSORS_DTYPES:
            raise MemoryFormerError(f"{self.path}: tensor {name!r} has dtype {code}; expected F32, BF16, F16 or I8")
        return _SAFETENSORS_DTYPES[code]

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        from safetensors import safe_open

        self.shape(name)
        with safe_open(self.path, framework="pt") as f:
            sl = f.get_slice(name)
            return sl[a:b] if len(self.info[name][0]) else sl[:]


class _RandomSource:
    """Random tensors of a model's shapes with its init's scale (tables as int8 rows + scales: fast to draw)."""

    def __init__(self, model: nn.Module, seed: int):
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        for name, m in model.named_modules():  # int8 draws come with a scale per row
            if hasattr(m, "table_scale") and hasattr(m, "tables"):
                self.shapes[f"{name}.table_scale" if name else "table_scale"] = tuple(m.tables.shape[:-1])
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = __import__("numpy").random.default_rng(seed)
        self.d = model.config.d_model

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.int8 if name.endswith(".tables") else torch.float32

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        shape = (b - a, *self.shapes[name][1:]) if self.shapes[name] else ()
        if name.endswith(".tables"):  # uniform bytes (fast to draw for GB of tables)
            n = math.prod(shape)
            return torch.frombuffer(bytearray(self.rng.bytes(n)), dtype=torch.int8).view(shape)
        if name.endswith(".table_scale"):  # uniform int8 has std 128/sqrt(3): dequantised std 0.02, the tables' init
            return torch.full(shape, 0.02 * math.sqrt(3) / 128)
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name:
            return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        std = 0.001 if leaf == "bias" else math.sqrt(2 / (5 * self.d))
        return torch.randn(shape, generator=self.gen) * std


def _convert(src, name: str, scale_name: str | None, dtype: torch.dtype, huge: bool):
    """Tensor `name` of `src` in `dtype` (int8: + one fp32 scale per row), converted CHUNK_BYTES at a time."""
    shape = src.shape(name)
    if not shape:
        return src.read(name, 0, 1).to(dtype), None
    ext = cpu_ext.get() if huge else None
    out = ext.huge_empty(list(shape), dtype) if ext is not None else torch.empty(shape, dtype=dtype)
    scale = torch.empty(shape[:-1]) if dtype == torch.int8 else None
    row = max(1, math.prod(shape[1:]))
    step = max(1, CHUNK_BYTES // (4 * row))
    stored_int8 = src.dtype(name) == torch.int8
    if stored_int8 and (scale_name is None or not src.has(scale_name)):
        raise MemoryFormerError(f"{getattr(src, 'path', 'source')}: int8 tensor {name!r} has no {scale_name!r}")
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        x = src.read(name, a, b)
        s = src.read(scale_name, a, b).float() if stored_int8 else None
        check_finite({name: x} if s is None else {name: x, scale_name: s}, str(getattr(src, "path", "source")))
        if dtype == torch.int8 and not stored_int8:
            quantize_rows_into(x.float(), out[a:b], scale[a:b])
            continue
        q, qs = _rows_to(x, s, dtype)
        out[a:b] = q
        if scale is not None:
            scale[a:b] = qs
    return out, scale


@torch.no_grad()
def _materialize(cfg: ModelConfig, src, tables, head, embed, huge_pages: bool, act=torch.float32) -> nn.Module:
    """Build `cfg`'s model on the meta device, then give each tensor real storage from `src` in its target dtype
    (None: as stored). Memory Layer tables land on huge pages when `huge_pages`."""
    from memoryformer.layers import MemoryLayer
    from memoryformer.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    done: set[str] = set()

    def join(prefix: str, leaf: str) -> str:
        return f"{prefix}.{leaf}" if prefix else leaf

    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for name, shape in expected.items():
        if src.has(name) and tuple(src.shape(name)) != shape:
            raise MemoryFormerError(f"{getattr(src, 'path', 'source')}: tensor {name!r} has shape "
                                    f"{tuple(src.shape(name))}, the config.json beside it implies {shape}")

    for prefix, m in list(model.named_modules()):
        if isinstance(m, MemoryLayer):
            name = join(prefix, "tables")
            q, scale = _convert(src, name, join(prefix, "table_scale"), tables or src.dtype(name), huge_pages)
            p = nn.Parameter(q, requires_grad=False)
            p._mf_huge = huge_pages and cpu_ext.get() is not None
            m.tables, m.table_scale, m.activation_dtype = p, scale, act
            done.update({name, join(prefix, "table_scale")})
        elif prefix in ("embed", "head"):
            name = join(prefix, "weight")
            dt = (embed if prefix == "embed" else head) or src.dtype(name)
            w, scale = _convert(src, name, join(prefix, "scale"), dt, False)
            if dt in (torch.int8, torch.bfloat16):
                cls = QuantizedEmbedding if prefix == "embed" else QuantizedLinear
                shape = (m.num_embeddings, m.embedding_dim) if prefix == "embed" else (m.in_features, m.out_features)
                new = cls(*shape, dtype=dt, device="meta")
                new.weight, new.scale = w, scale
                setattr(model, prefix, new)
            else:
                m.weight = nn.Parameter(w.float(), requires_grad=False)
            done.update({name, join(prefix, "scale")})
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in done or not t.is_meta:
            continue
        prefix, _, leaf = name.rpartition(".")
        module = model.get_submodule(prefix) if prefix else model
        if leaf in ("cos", "sin") and isinstance(module, type(model.rotary)):  # not saved: computed below
            module._buffers[leaf] = torch.empty(t.shape)
            continue
        if src.dtype(name) == torch.int8:
            raise MemoryFormerError(f"{getattr(src, 'path', 'source')}: {name!r} is int8; expected a float tensor")
        value = src.read(name, 0, src.shape(name)[0] if src.shape(name) else 1).float()
        check_finite({name: value}, str(getattr(src, "path", "source")))
        if leaf in module._buffers:
            module._buffers[leaf] = value
        else:
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
    model.rotary.reset_parameters()
    return model.eval()


def _read_config(path: Path) -> ModelConfig:
    if not path.is_dir():
        raise MemoryFormerError(f"{path}: not a checkpoint directory (expected {WEIGHTS} and {CONFIG} inside)")
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise MemoryFormerError(f"{path / name}: missing (a checkpoint holds {WEIGHTS} and {CONFIG})")
    return ModelConfig.load(path / CONFIG)


def load_for_inference(path, tables: str | None = "int8", head: str | None = "int8", embed: str | None = None,
                       device: str = "cpu", huge_pages: bool = True) -> nn.Module:
    """An inference model from a `memoryformer.save_model` / `save_for_inference` directory, built tensor by tensor.

    tables: "int8" (one scale per row), "bfloat16", "float16", "float32", or None (as stored). head: the LM head,
    "int8" (one scale per output row), "bfloat16", "float32", or None (as stored). embed: the token embedding, the
    same choices (default: as `head`). Tables already frozen in the file (`memoryformer.inference_tables`) are
    read as they are when the dtype matches, else converted. Each tensor is converted in chunks of CHUNK_BYTES, so
    the peak memory is the inference model plus one chunk. `device`: where the model ends up (built on the CPU).
    """
    path = Path(path)
    cfg = _read_config(path)
    src = _FileSource(path / WEIGHTS)
    tag = src.meta.get(TABLES_KEY)
    act = parse_tables_tag(tag, path / WEIGHTS)[1] if tag else torch.float32
    dts = [None if v is None else _precision(v, what) for v, what in ((tables, "tables"), (head, "head"),
                                                                       (embed if embed is not None else head, "embed"))]
    for dt, what in ((dts[1], "head"), (dts[2], "embed")):
        if dt == torch.float16:
            raise ValueError(f"{what}: expected 'int8', 'bfloat16' or 'float32', got 'float16'")
    model = _materialize(cfg, src, *dts, huge_pages=huge_pages and str(device) == "cpu", act=act)
    return model if device == "cpu" else model.to(device)


def random_inference_model(cfg: ModelConfig, tables: str = "int8", head: str = "int8", embed: str | None = None,
                           seed: int = 0, huge_pages: bool = True) -> nn.Module:
    """A MemoryFormer of `cfg` with random weights built directly in its inference precisions (benchmarks): the
    tables are drawn as int8 rows, so an int8 MF-small never holds more than its 2 GB."""
    with torch.device("meta"):
        from memoryformer.model import build_model

        shapes = build_model(cfg)
    src = _RandomSource(shapes, seed)
    return _materialize(cfg, src, _precision(tables, "tables"), _precision(head, "head"),
                        _precision(embed or head, "embed"), huge_pages=huge_pages)
