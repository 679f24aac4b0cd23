"""MemoryFormer and its dense control, top-down in one file.

MemoryFormer (Ding et al., NeurIPS 2024), as released by its authors:
- token embedding (vocab padded to 50 304), no absolute positions;
- each block (paper Eq. 13): pre-RMSNorm -> Q/K/V Memory Layers sharing one hash (one fused (K, 2**tau, 3d) table)
  -> partial rotary (25 % of each head, base 10 000) -> causal softmax attention -> **no output projection**
  -> residual; then RMSNorm -> Memory Block (MemoryLayer d->(tau+2)K, LayerNorm, MemoryLayer ->d) -> residual;
- final RMSNorm, untied linear LM head (the only fully-connected layer left).

Transformer is the Pythia / GPT-NeoX dense control: LayerNorm, parallel residual (x + attn(ln1 x) + mlp(ln2 x)),
fused QKV, output projection, GELU FFN of 4d, the same partial rotary, untied head.

Both: `forward(idx, targets=None) -> (logits, loss)`; `hidden(idx, cache=...)` is the body without the head, and the
one code path for training, scoring and decoding: given a `KVCache` the tokens continue what it holds (their keys and
values are written into it in place). Build on the meta device, `to_empty`, then `init_weights()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memoryformer.attention import build_attention
from memoryformer.config import ConfigError, ModelConfig
from memoryformer.layers import MemoryFFN, MemoryLayer, small_init_std

# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: rotary embedding, the KV cache, and causal attention over a fused (B, T, n_head * 3 * hd) projection


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding on the first `dims` of each head (rotate-half layout)."""

    def __init__(self, dims: int, max_seq_len: int, base: float):
        super().__init__()
        self.dims, self.max_seq_len, self.base = dims, max_seq_len, base
        self.register_buffer("cos", torch.empty(max_seq_len, dims), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dims), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.dims == 0:
            return
        dev = self.cos.device
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dims, 2, device=dev, dtype=torch.float32) / self.dims))
        t = torch.arange(self.max_seq_len, device=dev, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, dims/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, dims)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, nh, T, hd) at positions 0..T-1, or at `pos` (B, T) int64 (incremental decoding)."""
        if self.dims == 0:
            return x
        if pos is None:
            T = x.shape[-2]
            cos, sin = self.cos[:T], self.sin[:T]  # (T, dims)
        else:
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, T, dims)
        rot, keep = x[..., : self.dims], x[..., self.dims :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((rot * cos.to(x.dtype) + rotated * sin.to(x.dtype), keep), dim=-1)


class KVCache:
    """Keys and values of every block, preallocated and written in place as tokens are fed (rotary applied).

    k, v: (n_layer, B, n_head, capacity, head_dim). The first `length` slots are filled, the same for every row.
    `valid` (B, capacity) bool marks real tokens when rows of different lengths share a padded batch (the zero-shot
    scorer); None: every filled slot is real. Slots are attended causally: a new token sees the filled slots and
    the new slots up to its own.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, capacity: int, head_dim: int, *, device=None,
                 dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch, n_head, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.valid: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: "LanguageModel", batch: int, capacity: int | None = None) -> "KVCache":
        cfg = model.config
        w = model.norm.weight  # the hidden states' dtype (a quantised embedding still yields float32 rows)
        return cls(cfg.n_layer, batch, cfg.n_head, capacity or cfg.max_seq_len, cfg.head_dim, device=w.device,
                   dtype=w.dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.length, self.valid = 0, None

    def rows(self, index: torch.Tensor) -> "KVCache":
        """A new cache holding rows `index` (B',) of this one (e.g. a question's context once per choice)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k.index_select(1, index), self.v.index_select(1, index)
        out.length = self.length
        out.valid = None if self.valid is None else self.valid.index_select(0, index)
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write the new keys/values (B, nh, T, hd) of `layer` at slots length..length+T, attend to all filled ones."""
        L0, T = self.length, q.shape[2]
        end = L0 + T
        self.k[layer, :, :, L0:end] = k
        self.v[layer, :, :, L0:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # views: nothing copied
        if keys.dtype != q.dtype:  # autocast: activations in a lower precision than the cache
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        mask = None
        if self.valid is not None or T > 1:
            slots = torch.arange(end, device=q.device)
            mask = slots[None, :] <= (L0 + torch.arange(T, device=q.device))[:, None]  # (T, end): causal by slot
            if self.valid is not None:
                mask = mask[None, None] & self.valid[:, None, None, :end]  # (B, 1, T, end)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def advance(self, T: int, valid: torch.Tensor | None = None) -> None:
        """Mark T more slots filled (after every block has written them); `valid` (B, T) flags padded tokens."""
        if valid is not None and self.valid is None:
            self.valid = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=self.k.device)
        if self.valid is not None:
            self.valid[:, self.length : self.length + T] = True if valid is None else valid
        self.length += T


def attention(qkv: torch.Tensor, n_head: int, rotary: Rotary, pos: torch.Tensor | None = None,
              cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
    """Causal softmax attention. qkv (B, T, 3d) laid out per head as [q | k | v] (GPT-NeoX order) -> (B, T, d).

    Without a cache: over the T tokens themselves (training). With one: the tokens at positions `pos` (B, T) are
    appended to `cache` (block `layer`) and attend to everything it holds."""
    B, T, three_d = qkv.shape
    hd = three_d // (3 * n_head)
    q, k, v = qkv.view(B, T, n_head, 3 * hd).transpose(1, 2).split(hd, dim=-1)  # 3 x (B, nh, T, hd)
    q, k = rotary(q, pos), rotary(k, pos)
    v = v.to(q.dtype)
    if cache is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
    else:
        y = cache.attend(layer, q, k, v)
    return y.transpose(1, 2).reshape(B, T, n_head * hd)  # (B, T, d)


# ---------------------------------------------------------------------------------------------------------------
# MemoryFormer


class MemoryAttention(nn.Module):
    """Q, K, V Memory Layers on one shared hash (one gather over a fused 3d-wide table), no output projection."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = MemoryLayer(
            cfg.d_model, 3 * cfg.d_model, cfg.tau, bias=cfg.memory_bias, weighting=cfg.weighting,
            temperature=cfg.temperature, bit_order=cfg.bit_order, hash_projection=cfg.hash_projection,
            backend=cfg.backend,
        )
        self.rotary = rotary

    def forward(self, x, pos=None, cache=None, layer=0):  # (B, T, d) -> (B, T, d)
        return attention(self.qkv(x), self.n_head, self.rotary, pos, cache, layer)


class MemoryFormerBlock(nn.Module):
    """Paper Eq. 13 (with the Norm(Z) the code and Fig. 3 use): x + attn(norm1 x), then + ffn(norm2 .)."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=1e-8)
        self.attn = MemoryAttention(cfg, rotary)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=1e-8)
        self.mlp = MemoryFFN(
            cfg.d_model, cfg.tau, cfg.expand_bits, activation=cfg.block_activation, bias=cfg.memory_bias,
            weighting=cfg.weighting, temperature=cfg.temperature, bit_order=cfg.bit_order,
            hash_projection=cfg.hash_projection, backend=cfg.backend,
        )

    def forward(self, x, pos=None, cache=None, layer=0):  # (B, T, d)
        x = x + self.attn(self.norm1(x), pos, cache, layer)
        return x + self.mlp(self.norm2(x))


def _require_config(cfg) -> None:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"config: expected a memoryformer.ModelConfig, got {type(cfg).__name__}")


class LanguageModel(nn.Module):
    """Embedding -> blocks -> final norm -> untied head: what both architectures share."""

    arch: str

    def __init__(self, cfg: ModelConfig, block_cls, final_norm: nn.Module):
        super().__init__()
        _require_config(cfg)
        if cfg.arch != self.arch:
            raise ConfigError(f"arch: {type(self).__name__} needs arch={self.arch!r} (got {cfg.arch!r}); use build_model")
        self.config = cfg
        self.rotary = Rotary(cfg.rotary_dims, cfg.max_seq_len, cfg.rotary_base)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(block_cls(cfg, self.rotary) for _ in range(cfg.n_layer))
        self.norm = final_norm
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None):
        """idx (B, T) int64 token ids; targets (B, T) or None (-1 = ignore); `cache`: continue a KVCache.

        Returns (logits (B, T, vocab), loss: mean cross-entropy or None).
        """
        if targets is not None:
            self._check_targets(idx, targets)
        logits = self.head(self.hidden(idx, cache=cache))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def hidden(self, idx: torch.Tensor, *, cache: KVCache | None = None, pos: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d) of idx (B, T); `model.head` of them gives the logits.

        With `cache` the tokens continue it: positions `pos` (B, T) (default: the next ones), their keys and values
        are written into it and it advances by T; `valid` (B, T) bool marks padding in rows of unequal length.
        """
        B, T = self._check_ids(idx)
        if cache is not None:
            if not self.supports_kv_cache():
                raise ValueError(f"attention: {self.config.attention!r} has no KV-cached path; pass no cache")
            if cache.batch != B:
                raise ValueError(f"cache: holds {cache.batch} rows, but idx has {B}")
            if cache.length + T > cache.capacity:
                raise ValueError(f"cache: {cache.length} + {T} tokens exceed its capacity of {cache.capacity}")
            if pos is None:
                pos = torch.arange(cache.length, cache.length + T, device=idx.device).expand(B, T)
            if pos.numel() and int(pos.max()) >= self.config.max_seq_len:
                raise ValueError(f"max_seq_len: position {int(pos.max())} is beyond the model's "
                                 f"max_seq_len={self.config.max_seq_len}")
        elif T > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {T} tokens exceeds the model's max_seq_len={self.config.max_seq_len}")
        x = self.embed(idx)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cache, i)
        if cache is not None:
            cache.advance(T, valid)
        return self.norm(x)

    def _check_ids(self, idx: torch.Tensor) -> tuple[int, int]:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.ndim != 2:
            got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx: expected a (B, T) integer tensor of token ids, got {got}")
        if idx.device.type == "cpu" and idx.numel():  # on GPUs this check would cost a sync per forward
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"idx: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return idx.shape[0], idx.shape[1]

    def _check_targets(self, idx: torch.Tensor, targets: torch.Tensor) -> None:
        if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape or targets.is_floating_point():
            got = f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets: expected integer token ids of idx's shape {tuple(idx.shape)}, got {got}")
        if targets.device.type == "cpu" and targets.numel():
            lo, hi = int(targets.min()), int(targets.max())
            if lo < -1 or hi >= self.config.vocab_size:
                raise ValueError(f"targets: token id {lo if lo < -1 else hi} is outside [0, {self.config.vocab_size}) "
                                 "(-1 = ignore)")

    def supports_kv_cache(self) -> bool:
        """Softmax attention in every block (the Table 2 efficient attentions have no cached path)."""
        return all(getattr(b.attn, "core", None) is None for b in self.blocks)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer (also after `to_empty` from the meta device)."""
        std = small_init_std(self.config.d_model)
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.head.weight, std=std)
        self.rotary.reset_parameters()
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        self._init_blocks()

    def _init_blocks(self) -> None:
        raise NotImplementedError

    def num_params(self) -> dict[str, int]:
        """Parameter counts and bytes, split into memory tables and everything else ("dense")."""
        out = dict(dense=0, table=0, dense_bytes=0, table_bytes=0)
        for name, p in self.named_parameters():
            kind = "table" if name.endswith("tables") else "dense"
            out[kind] += p.numel()
            out[f"{kind}_bytes"] += p.numel() * p.element_size()
        out["total"] = out["dense"] + out["table"]
        out["total_bytes"] = out["dense_bytes"] + out["table_bytes"]
        return out

    def param_groups(self, weight_decay: float = 0.1, table_weight_decay: float | None = None) -> list[dict]:
        """AdamW groups: matrices decayed, biases/norms not, memory tables in their own group.

        `table_weight_decay` defaults to `weight_decay` (the authors decay the tables); 0 excludes them.
        """
        decay, no_decay, tables = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("tables"):
                tables.append(p)
            elif p.ndim >= 2:
                decay.append(p)
            else:
                no_decay.append(p)
        twd = weight_decay if table_weight_decay is None else table_weight_decay
        groups = [
            dict(params=decay, weight_decay=weight_decay, name="decay"),
            dict(params=no_decay, weight_decay=0.0, name="no_decay"),
            dict(params=tables, weight_decay=twd, name="tables"),
        ]
        return [g for g in groups if g["params"]]


class MemoryFormer(LanguageModel):
    """The MemoryFormer language model. `MemoryFormer(get_config("tiny"))`."""

    arch = "memoryformer"

    def __init__(self, cfg: ModelConfig):
        _require_config(cfg)  # before cfg.d_model below
        super().__init__(cfg, MemoryFormerBlock, nn.RMSNorm(cfg.d_model, eps=1e-8))

    def _init_blocks(self) -> None:
        qkv_std = small_init_std(self.config.d_model)  # authors re-initialise the Q/K/V tables with small_init
        for block in self.blocks:
            block.attn.qkv.reset_parameters(std=qkv_std)
            block.mlp.l1.reset_parameters(std=0.02)
            block.mlp.l2.reset_parameters(std=0.02)


# ---------------------------------------------------------------------------------------------------------------
# The dense control: Pythia / GPT-NeoX


class DenseAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.rotary = rotary
        # Table 2 baselines (memoryformer.attention); softmax keeps the plain path and its checkpoint keys
        self.core = None if cfg.attention == "softmax" else build_attention(cfg, rotary)

    def forward(self, x, pos=None, cache=None, layer=0):  # (B, T, d)
        qkv = self.qkv(x)  # (B, T, 3d)
        y = attention(qkv, self.n_head, self.rotary, pos, cache, layer) if self.core is None else self.core(qkv)
        return self.proj(y)


class DenseFFN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model)
        self.proj = nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attn = DenseAttention(cfg, rotary)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.mlp = DenseFFN(cfg)

    def forward(self, x, pos=None, cache=None, layer=0):  # parallel residual, as Pythia
        return x + self.attn(self.norm1(x), pos, cache, layer) + self.mlp(self.norm2(x))


class Transformer(LanguageModel):
    """The Pythia-shaped dense control. `Transformer(get_config("pythia-70m"))`."""

    arch = "transformer"

    def __init__(self, cfg: ModelConfig):
        _require_config(cfg)
        super().__init__(cfg, TransformerBlock, nn.LayerNorm(cfg.d_model, eps=1e-5))

    def _init_blocks(self) -> None:
        d, L = self.config.d_model, self.config.n_layer
        small, wang = small_init_std(d), 2.0 / (L * d**0.5)  # GPT-NeoX small_init / wang_init
        for block in self.blocks:
            for lin, std in ((block.attn.qkv, small), (block.attn.proj, wang), (block.mlp.fc, small), (block.mlp.proj, wang)):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
            if block.attn.core is not None:
                block.attn.core.reset_parameters()


def build_model(cfg: ModelConfig) -> LanguageModel:
    """MemoryFormer or Transformer, by `cfg.arch`."""
    return {"memoryformer": MemoryFormer, "transformer": Transformer}[cfg.arch](cfg)
