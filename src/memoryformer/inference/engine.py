"""The decode engine: the whole decode step of a MemoryFormer (embedding, every block, final norm, head) in one C++
call (`ops/csrc/engine.cpp`) over a preallocated cache (layer, batch, head, max_seq_len, head_dim).

The eager model stays the reference: the engine reads the model's own tensors and matches `model(idx)[0]`
(tests/test_inference_engine.py). The seam is named: the engine receives the config fields it uses by name
(`engine_config`), the model-level tensors by state-dict name (`model_tensors`) and each block's tensors by
their `MemoryFormerBlock` state-dict names (`block_tensors`); the C++ side reads each by name and refuses any it
does not read, so a tensor added to the block fails loudly instead of being ignored.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from memoryformer.config import MemoryFormerError, ModelConfig
from memoryformer.inference.quantized import QuantizedEmbedding, QuantizedLinear
from memoryformer.layers import MemoryLayer
from memoryformer.ops import cpu_ext
from memoryformer.ops.int4 import is_int4
from memoryformer.resources import check_fits

# ModelConfig fields (of those `fields_that_apply()` keeps for a MemoryFormer) that reach the engine other than
# by their own name in `engine_config`, and how. A new field must be added to `engine_config` (and read in
# engine.cpp) or here, else tests/test_inference_engine.py fails.
CONFIG_FIELDS_ELSEWHERE = {
    "arch": "DecodeEngine.why_not accepts MemoryFormer only",
    "hash_projection": "DecodeEngine.why_not refuses it",
    "backend": "which eager kernel runs; the engine is one kernel",
    "memory_bias": "the blocks' `bias` tensors are present or not",
    "rotary_pct": "rotary_dims",
    "rotary_base": "the rotary.cos / rotary.sin tables",
    "max_seq_len": "the rotary tables' rows; the cache holds up to max_seq_len positions",
}


def engine_config(cfg: ModelConfig, model: nn.Module, batch_size: int, max_seq_len: int, kv: torch.dtype) -> dict:
    """The numbers and choices the engine computes with, by name."""
    return dict(
        n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head, vocab_size=cfg.vocab_size, tau=cfg.tau,
        expand_bits=cfg.expand_bits, rotary_dims=cfg.rotary_dims, temperature=cfg.temperature,
        weighting=cfg.weighting, bit_order=cfg.bit_order, block_activation=cfg.block_activation or "none",
        rms_eps=_eps(model.blocks[0].norm1), ln_eps=model.blocks[0].mlp.norm.eps, cache_len=max_seq_len,
        batch_size=batch_size, kv_dtype=kv,
    )


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors outside the blocks by state-dict name (embed.*, norm.weight, head.*), plus the rotary tables."""
    out = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    empty = torch.zeros(0, 0)
    out["rotary.cos"] = model.rotary.cos if model.config.rotary_dims else empty
    out["rotary.sin"] = model.rotary.sin if model.config.rotary_dims else empty
    return out


def block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of one `MemoryFormerBlock`, by its state-dict name (norm1.weight, attn.qkv.tables, ...)."""
    return dict(block.state_dict())


class DecodeEngine:
    """Batch-`batch_size` decoding of a MemoryFormer with a static KV cache, one C++ call per step.

    Args:
        model: a `memoryformer.MemoryFormer` on CPU: fp32 / bf16 / fp16 / int8 tables, an fp32, bf16 or int8 head
            and embedding (`memoryformer.freeze`); no hash projection, no int4 rows (`why_not` says so, and
            `generate` and the server then decode eagerly). For decode speed put its tables on huge
            pages first (`tables_to_huge_pages`; the loader and `freeze` do).
        batch_size: rows decoded together (each its own hash, cache region and position: `feed` runs any rows at
            their own positions in one call; `prefill` / `step` / `append` move all rows together).
        max_seq_len: cache length (default: the model's). Positions must stay below it.
        kv_dtype: cache precision, torch.float32 or torch.bfloat16; default float32 for fp32 tables, else bfloat16
            (half the bytes attention reads per token at long contexts).
        threads: threads of the compiled kernels (default: torch's; see `ops.cpu_ext.threads`).

    `prefill(ids (B, T))` resets the cache and returns the logits of the last token (B, V); `step(ids (B,))`
    appends one token and returns its logits; `append(ids (B, T))` appends several; `reset()` empties the cache.
    Logits are float32.
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 1, max_seq_len: int | None = None,
                 kv_dtype: torch.dtype | None = None, threads: int | None = None):
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
        table_dtype = model.blocks[0].attn.qkv.tables.dtype
        kv = kv_dtype or (torch.float32 if table_dtype == torch.float32 else torch.bfloat16)
        if kv not in (torch.float32, torch.bfloat16):
            raise ValueError(f"kv_dtype: expected torch.float32 or torch.bfloat16, got {kv}")
        cache_bytes = 2 * cfg.n_layer * batch_size * S * cfg.d_model * kv.itemsize  # keys and values
        check_fits(cache_bytes, f"the decode engine's KV cache ({batch_size} rows x {S} positions)")
        # a weak reference: `engine_for` keeps engines in a WeakKeyDictionary keyed by their model, which a strong one
        # would keep alive for ever (the compiled engine holds the tensors it reads itself)
        self._model = weakref.ref(model)
        self.config, self.batch_size, self.max_seq_len, self.kv_dtype = cfg, batch_size, S, kv
        self._engine = ext.Engine(engine_config(cfg, model, batch_size, S, kv), model_tensors(model),
                                  [block_tensors(b) for b in model.blocks])

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
        if any(isinstance(m, MemoryLayer) and is_int4(m.tables) for m in model.modules()):
            return "int4 tables: the compiled engine reads int8/bf16/fp16/fp32 rows"
        if any(is_int4(getattr(m, "weight", None)) for m in (model.embed, model.head)):
            return "an int4 head or embedding: the compiled engine reads int8/bf16/fp32 rows"
        return None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return cls.why_not(model) is None and cpu_ext.get() is not None

    @property
    def pos(self) -> int:
        """Tokens in the cache (the position the next token gets), when every row is at the same one."""
        positions = self.positions
        if len(set(positions)) > 1:
            raise ValueError(f"pos: the rows are at different positions {positions} (see positions)")
        return positions[0]

    @property
    def positions(self) -> list[int]:
        """Each row's tokens in the cache."""
        return list(self._engine.positions())

    def set_position(self, row: int, pos: int) -> None:
        """Move row `row` to position `pos` (0 empties it; its later tokens overwrite the cache from there)."""
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row: expected 0..{self.batch_size - 1}, got {row}")
        if not 0 <= pos <= self.max_seq_len:
            raise ValueError(f"pos: expected 0..{self.max_seq_len}, got {pos}")
        self._engine.set_row_pos(row, pos)

    def reset(self) -> None:
        self._engine.set_pos(0)

    def feed(self, rows: torch.Tensor, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Tokens of any rows in one call, each row at its own position: ids[i] goes to row rows[i] at that row's
        next position (a row's tokens in order); returns the (last.sum(), V) logits of the tokens where `last` is
        True, in order. A decode step lists one token per active row, a prompt (or a chunk of it) its tokens with
        only the final one in `last`; both can share a call, and rows not listed cost nothing."""
        rows, ids, last = (torch.as_tensor(t).reshape(-1) for t in (rows, ids, last))
        if not (rows.numel() == ids.numel() == last.numel()) or ids.numel() == 0:
            raise ValueError(f"feed: rows, ids and last must be non-empty and of one length, got {rows.numel()}, "
                             f"{ids.numel()}, {last.numel()}")
        if int(rows.min()) < 0 or int(rows.max()) >= self.batch_size:
            raise ValueError(f"rows: expected rows in 0..{self.batch_size - 1}, got {rows.tolist()}")
        vocab = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"ids: token ids must lie in [0, {vocab})")
        ends = torch.tensor(self.positions) + torch.bincount(rows, minlength=self.batch_size)
        if int(ends.max()) > self.max_seq_len:
            row = int(ends.argmax())
            raise ValueError(f"max_seq_len: row {row} would hold {int(ends[row])} positions, the cache {self.max_seq_len}")
        return self._engine.forward_rows(rows, ids, last.to(torch.bool))

    def _ids(self, ids: torch.Tensor, ndim: int) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.ndim != ndim:
            shape = "(B,)" if ndim == 1 else "(B, T)"
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids: expected a {shape} integer tensor of token ids, got {got}")
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"ids: batch of {ids.shape[0]} rows, the engine was built for batch_size={self.batch_size}")
        n = 1 if ndim == 1 else ids.shape[1]
        if max(self.positions) + n > self.max_seq_len:
            raise ValueError(f"max_seq_len: {max(self.positions) + n} positions exceed the engine's cache of {self.max_seq_len}")
        return ids.cpu()

    def append(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) after the cached tokens -> logits (B, V) of the last one."""
        return self._engine.forward(self._ids(ids, 2))

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
            with cpu_ext.torch_serial():
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


def _tensor_key(model: nn.Module) -> list[int]:
    return [t.data_ptr() for t in (*model.parameters(), *model.buffers())]


def engine_for(model: nn.Module, batch_size: int = 1) -> DecodeEngine | None:
    """The `DecodeEngine` of `model` for `batch_size` rows, built on first use and kept while the model's tensors
    are the same ones; None when the engine cannot run this model (see `DecodeEngine.why_not`)."""
    if not DecodeEngine.supports(model):
        return None
    key = _tensor_key(model)
    hit = _ENGINES.get(model)
    if hit is not None and hit[0] == key and hit[1].batch_size == batch_size:
        return hit[1]
    engine = DecodeEngine(model, batch_size=batch_size)
    _ENGINES[model] = (key, engine)
    return engine


def _eps(norm: nn.Module) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


__all__ = ["CONFIG_FIELDS_ELSEWHERE", "DecodeEngine", "block_tensors", "engine_config", "engine_for", "model_tensors"]
