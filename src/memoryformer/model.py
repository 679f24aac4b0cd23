"""MemoryFormer and its dense control, top-down in one file.

MemoryFormer (Ding et al., NeurIPS 2024), as released by its authors:
- token embedding (vocab padded to 50 304), no absolute positions;
- each block: pre-RMSNorm -> Q/K/V Memory Layers sharing one hash (one fused (K, 2**tau, 3d) table)
  -> partial rotary (25 % of each head, base 10 000) -> causal softmax attention -> **no output projection**
  -> residual; then RMSNorm -> Memory Block (MemoryLayer d->(tau+2)K, LayerNorm, MemoryLayer ->d) -> residual;
- final RMSNorm, untied linear LM head (the only fully-connected layer left).

Transformer is the Pythia / GPT-NeoX dense control: LayerNorm, parallel residual (x + attn(ln1 x) + mlp(ln2 x)),
fused QKV, output projection, GELU FFN of 4d, the same partial rotary, untied head.

Both: `forward(idx, targets=None) -> (logits, loss)`; build on the meta device, `to_empty`, then `init_weights()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memoryformer.attention import build_attention
from memoryformer.config import ConfigError, ModelConfig
from memoryformer.layers import MemoryBlock, MemoryLayer, small_init_std

# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: rotary embedding and causal attention over a fused (B, T, n_head * 3 * head_dim) projection.


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, nh, T, hd) -> same, positions 0..T-1
        if self.dims == 0:
            return x
        T = x.shape[-2]
        return self._rotate(x, self.cos[:T], self.sin[:T])  # (T, dims)

    def at(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotary at explicit positions: x (B, nh, T, hd), pos (B, T) int64 (incremental decoding)."""
        if self.dims == 0:
            return x
        return self._rotate(x, self.cos[pos][:, None], self.sin[pos][:, None])  # (B, 1, T, dims)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, keep = x[..., : self.dims], x[..., self.dims :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((rot * cos.to(x.dtype) + rotated * sin.to(x.dtype), keep), dim=-1)


def causal_attention(qkv: torch.Tensor, n_head: int, rotary: Rotary) -> torch.Tensor:
    """qkv: (B, T, 3d) laid out per head as [q | k | v] (GPT-NeoX order) -> (B, T, d)."""
    B, T, three_d = qkv.shape
    hd = three_d // (3 * n_head)
    q, k, v = qkv.view(B, T, n_head, 3 * hd).transpose(1, 2).split(hd, dim=-1)  # 3 x (B, nh, T, hd)
    q, k = rotary(q), rotary(k)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
    return y.transpose(1, 2).reshape(B, T, n_head * hd)  # (B, T, d)


# Incremental decoding: the same attention at explicit positions over cached keys/values. Used by `generate`
# (KV cache) and by the zero-shot scorer (one pass over a shared context, then every choice from its cache).
KVCache = list  # per block: (keys, values), each (B, n_head, P, head_dim), rotary already applied


def cached_attention(qkv: torch.Tensor, n_head: int, rotary: Rotary, pos: torch.Tensor,
                     past: tuple[torch.Tensor, torch.Tensor] | None = None, past_valid: torch.Tensor | None = None):
    """Causal attention of new tokens (qkv (B, T, 3d) at positions pos (B, T)) over [past keys/values; themselves].

    `past_valid` (B, P) bool masks padded cache entries (None: all valid). Returns (y (B, T, d), (k, v) of the new
    tokens) so the caller can extend its cache.
    """
    B, T, three_d = qkv.shape
    hd = three_d // (3 * n_head)
    q, k, v = qkv.view(B, T, n_head, 3 * hd).transpose(1, 2).split(hd, dim=-1)  # 3 x (B, nh, T, hd)
    q, k = rotary.at(q, pos), rotary.at(k, pos)
    v = v.to(q.dtype)
    if past is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        pk, pv = past
        mask = None
        if past_valid is not None or T > 1:
            P = pk.shape[2]
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            seen = past_valid if past_valid is not None else torch.ones(B, P, dtype=torch.bool, device=q.device)
            mask = torch.cat((seen[:, None, None, :].expand(B, 1, T, P), causal.expand(B, 1, T, T)), dim=-1)
        y = F.scaled_dot_product_attention(q, torch.cat((pk, k), 2), torch.cat((pv, v), 2), attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, n_head * hd), (k, v)


# ---------------------------------------------------------------------------------------------------------------
# MemoryFormer


class MemoryAttention(nn.Module):
    """Q, K, V Memory Layers on one shared hash (one gather over a fused 3d-wide table), no output projection."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = MemoryLayer(
            cfg.d_model, 3 * cfg.d_model, cfg.tau,
            bias=cfg.memory_bias, weighting=cfg.weighting, temperature=cfg.temperature,
            bit_order=cfg.bit_order, hash_projection=cfg.hash_projection,
        )
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return causal_attention(self.qkv(x), self.n_head, self.rotary)


class MemoryFormerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=1e-8)
        self.attn = MemoryAttention(cfg, rotary)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=1e-8)
        self.mlp = MemoryBlock(
            cfg.d_model, cfg.tau, cfg.expand_bits, activation=cfg.block_activation,
            bias=cfg.memory_bias, weighting=cfg.weighting, temperature=cfg.temperature,
            bit_order=cfg.bit_order, hash_projection=cfg.hash_projection,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x, pos, past=None, past_valid=None):
        a, kv = cached_attention(self.attn.qkv(self.norm1(x)), self.attn.n_head, self.attn.rotary, pos, past, past_valid)
        x = x + a
        return x + self.mlp(self.norm2(x)), kv


class _LanguageModel(nn.Module):
    """Embedding -> blocks -> final norm -> untied head; the parts both architectures share."""

    arch: str

    def __init__(self, cfg: ModelConfig, block_cls, final_norm: nn.Module):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"config: expected a memoryformer.ModelConfig, got {type(cfg).__name__}")
        if cfg.arch != self.arch:
            raise ConfigError(f"arch: {type(self).__name__} needs arch={self.arch!r} (got {cfg.arch!r}); use build_model")
        self.config = cfg
        self.rotary = Rotary(cfg.rotary_dims, cfg.max_seq_len, cfg.rotary_base)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(block_cls(cfg, self.rotary) for _ in range(cfg.n_layer))
        self.norm = final_norm
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) int64 token ids; targets (B, T) or None (-1 = ignore).

        Returns (logits (B, T, vocab), loss: mean cross-entropy or None).
        """
        if idx.dtype not in (torch.int64, torch.int32) or idx.ndim != 2:
            raise ValueError(f"idx: expected a (B, T) integer tensor of token ids, got {tuple(idx.shape)} {idx.dtype}")
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {T} tokens exceeds the model's max_seq_len={self.config.max_seq_len}")
        x = self.embed(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def supports_kv_cache(self) -> bool:
        """Softmax attention in every block (the Table 2 efficient attentions have no cached path)."""
        return all(getattr(b.attn, "core", None) is None for b in self.blocks)

    def forward_cached(self, idx: torch.Tensor, pos: torch.Tensor, past: KVCache | None = None,
                       past_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """(B, T) ids at positions pos (B, T) after a cache of earlier tokens -> (final-norm hidden (B, T, d), the
        new tokens' per-block (k, v)); `model.head(hidden)` gives the logits. Equal to `forward` when the cache holds
        the tokens before them (see `cached_attention` for `past_valid`)."""
        if not self.supports_kv_cache():
            raise ValueError(f"attention: {self.config.attention!r} has no KV-cached path; use forward()")
        if pos.numel() and int(pos.max()) >= self.config.max_seq_len:
            raise ValueError(f"max_seq_len: position {int(pos.max())} is beyond the model's max_seq_len={self.config.max_seq_len}")
        x, kvs = self.embed(idx), []
        for i, block in enumerate(self.blocks):
            x, kv = block.forward_cached(x, pos, None if past is None else past[i], past_valid)
            kvs.append(kv)
        return self.norm(x), kvs

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


class MemoryFormer(_LanguageModel):
    """The MemoryFormer language model. `MemoryFormer(get_config("tiny"))`."""

    arch = "memoryformer"

    def __init__(self, cfg: ModelConfig):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        qkv = self.qkv(x)  # (B, T, 3d)
        y = causal_attention(qkv, self.n_head, self.rotary) if self.core is None else self.core(qkv)
        return self.proj(y)


class DenseMLP(nn.Module):
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
        self.mlp = DenseMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # parallel residual, as Pythia
        return x + self.attn(self.norm1(x)) + self.mlp(self.norm2(x))

    def forward_cached(self, x, pos, past=None, past_valid=None):
        att = self.attn
        a, kv = cached_attention(att.qkv(self.norm1(x)), att.n_head, att.rotary, pos, past, past_valid)
        return x + att.proj(a) + self.mlp(self.norm2(x)), kv


class Transformer(_LanguageModel):
    """The Pythia-shaped dense control. `Transformer(get_config("pythia-70m"))`."""

    arch = "transformer"

    def __init__(self, cfg: ModelConfig):
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


def build_model(cfg: ModelConfig) -> _LanguageModel:
    """MemoryFormer or Transformer, by `cfg.arch`."""
    return {"memoryformer": MemoryFormer, "transformer": Transformer}[cfg.arch](cfg)
