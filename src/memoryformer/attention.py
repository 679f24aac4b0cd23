"""Causal efficient-attention baselines for the dense control (paper Table 2): Linformer, cosFormer, Performer.

Each takes the fused per-head [q | k | v] projection (B, T, 3d) of `DenseAttention` and returns (B, T, d); the
output projection stays in `DenseAttention`. All three are causal: the output at position t depends on tokens <= t
only, so right padding and shorter sequences never change earlier outputs.

- Linformer (Wang et al. 2020) projects keys and values along the sequence (E, F in R^{k x n}), which looks at
  the future. The causal version here makes that projection block-diagonal: the window of n = max_seq_len tokens
  is cut into k blocks of c = n / k tokens; each block is compressed into one key and one value row by learned
  weights E, F in R^{k x c}. A query attends, in one softmax, to the compressed rows of all *earlier* blocks and
  exactly to the tokens of its own block up to itself. A block's summary is only seen once it is complete, so no
  future token leaks; the cost per query is at most k + c keys instead of t.
- cosFormer (Qin et al. 2022): ReLU feature maps and the cos re-weighting cos(pi/2 * (i - j) / M), which splits
  into cos/sin terms of i and j, so attention is linear and causal with prefix sums. M = max_seq_len (a causal
  model cannot use the current length). cosFormer's re-weighting is its position signal, so no rotary here.
- Performer (Choromanski et al. 2021), FAVOR+: positive orthogonal random features
  phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(m) approximate the softmax kernel; causal by prefix sums. Rotary is
  applied to q and k first, as in softmax attention; the features are fixed (a saved buffer, not redrawn).

The linear attentions run chunk by chunk (exact within a chunk, a carried m x d state across chunks), which is
the prefix-sum recurrence with O(T) memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from memoryformer.config import ATTENTIONS


def split_heads(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3d) in GPT-NeoX per-head [q | k | v] order -> 3 x (B, nh, T, hd)."""
    B, T, three_d = qkv.shape
    hd = three_d // (3 * n_head)
    return qkv.view(B, T, n_head, 3 * hd).transpose(1, 2).split(hd, dim=-1)


def merge_heads(y: torch.Tensor) -> torch.Tensor:  # (B, nh, T, hd) -> (B, T, d)
    B, nh, T, hd = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hd)


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int = 64,
                            eps: float = 1e-6) -> torch.Tensor:
    """out_t = sum_{s<=t} (fq_t . fk_s) v_s / sum_{s<=t} fq_t . fk_s.

    fq, fk: (B, nh, T, m) non-negative features; v: (B, nh, T, hd) -> (B, nh, T, hd).
    """
    B, nh, T, m = fq.shape
    state = fq.new_zeros(B, nh, m, v.shape[-1])  # sum of fk_s v_s^T over earlier chunks
    norm = fq.new_zeros(B, nh, m)  # sum of fk_s over earlier chunks
    out = []
    for s in range(0, T, chunk):
        q, k, vv = fq[:, :, s : s + chunk], fk[:, :, s : s + chunk], v[:, :, s : s + chunk]
        a = (q @ k.transpose(-1, -2)).tril()  # (B, nh, L, L): within the chunk, causal
        num = a @ vv + q @ state  # (B, nh, L, hd)
        den = a.sum(-1) + (q @ norm[..., None])[..., 0]  # (B, nh, L)
        out.append(num / (den[..., None] + eps))
        state = state + k.transpose(-1, -2) @ vv
        norm = norm + k.sum(-2)
    return torch.cat(out, dim=2)


class LinformerAttention(nn.Module):
    """Causal block-compressed Linformer; `k` compressed rows per max_seq_len window (see the module docstring)."""

    def __init__(self, n_head: int, max_seq_len: int, k: int, rotary: nn.Module):
        super().__init__()
        if max_seq_len % k:
            raise ValueError(f"linformer_k={k} must divide max_seq_len={max_seq_len}")
        self.n_head, self.k, self.block = n_head, k, max_seq_len // k
        self.rotary = rotary
        self.E = nn.Parameter(torch.empty(k, self.block))  # key compression weights, one row per block
        self.F = nn.Parameter(torch.empty(k, self.block))  # value compression weights
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # start as the block mean (a sensible summary) plus noise so the weights can specialise per position
        for p in (self.E, self.F):
            p.copy_(torch.full_like(p, 1.0 / self.block) + 0.02 * torch.randn_like(p) / math.sqrt(self.block))

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:  # (B, T, 3d) -> (B, T, d)
        q, k, v = split_heads(qkv, self.n_head)
        q, k = self.rotary(q), self.rotary(k)
        v = v.to(q.dtype)
        B, nh, T, hd = q.shape
        c = self.block
        nb = -(-T // c)
        pad = nb * c - T
        if pad:  # pad at the end: padded keys are later than every real query, so the causal masks drop them
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        qb, kb, vb = (t.view(B, nh, nb, c, hd) for t in (q, k, v))
        ck = torch.einsum("bhncd,nc->bhnd", kb, self.E[:nb].to(q.dtype))  # (B, nh, nb, hd) block summaries
        cv = torch.einsum("bhncd,nc->bhnd", vb, self.F[:nb].to(q.dtype))
        scale = 1.0 / math.sqrt(hd)
        local = (qb @ kb.transpose(-1, -2)) * scale  # (B, nh, nb, c, c)
        local = local.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        far = torch.einsum("bhncd,bhmd->bhncm", qb, ck) * scale  # (B, nh, nb, c, nb): query block n, summary m
        earlier = torch.arange(nb, device=q.device)[None, :] < torch.arange(nb, device=q.device)[:, None]  # m < n
        far = far.masked_fill(~earlier[None, None, :, None, :], float("-inf"))
        p = torch.softmax(torch.cat((local, far), dim=-1).float(), dim=-1).to(q.dtype)
        y = p[..., :c] @ vb + torch.einsum("bhncm,bhmd->bhncd", p[..., c:], cv)  # (B, nh, nb, c, hd)
        return merge_heads(y.reshape(B, nh, nb * c, hd)[:, :, :T])


class CosFormerAttention(nn.Module):
    """Causal cosFormer: ReLU features with cos(pi/2 (i - j) / M) re-weighting, M = max_seq_len."""

    def __init__(self, n_head: int, max_seq_len: int, chunk: int = 64):
        super().__init__()
        self.n_head, self.horizon, self.chunk = n_head, max_seq_len, chunk

    def reset_parameters(self) -> None:  # no parameters
        pass

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(qkv, self.n_head)
        T = q.shape[2]
        angle = (math.pi / 2) * torch.arange(T, device=q.device, dtype=torch.float32) / self.horizon  # (T,)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (T, 1)
        q, k = F.relu(q.float()), F.relu(k.float())
        fq = torch.cat((q * cos, q * sin), dim=-1)  # (B, nh, T, 2hd)
        fk = torch.cat((k * cos, k * sin), dim=-1)
        y = causal_linear_attention(fq, fk, v.float(), self.chunk)
        return merge_heads(y.to(qkv.dtype))


class PerformerAttention(nn.Module):
    """Causal Performer (FAVOR+) with `features` positive orthogonal random features per head."""

    def __init__(self, n_head: int, head_dim: int, features: int, rotary: nn.Module, seed: int = 0, chunk: int = 64):
        super().__init__()
        self.n_head, self.head_dim, self.features, self.seed, self.chunk = n_head, head_dim, features, seed, chunk
        self.rotary = rotary
        self.register_buffer("proj", torch.empty(features, head_dim))  # saved, so a checkpoint scores the same
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        d, blocks = self.head_dim, []
        for _ in range(-(-self.features // d)):
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))  # orthogonal rows
            blocks.append(q.T)
        w = torch.cat(blocks)[: self.features]
        w = w * torch.randn(self.features, d, generator=g).norm(dim=1, keepdim=True)  # chi-distributed row norms
        self.proj.copy_(w.to(self.proj.device, self.proj.dtype))

    def _features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        x = x.float() * self.head_dim**-0.25  # so that phi(q) . phi(k) ~ exp(q . k / sqrt(hd))
        wx = x @ self.proj.float().T  # (B, nh, T, m)
        logits = wx - (x * x).sum(-1, keepdim=True) / 2
        if is_query:  # a per-query constant cancels between numerator and denominator; a per-key one would not
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return torch.exp(logits) / math.sqrt(self.features)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(qkv, self.n_head)
        q, k = self.rotary(q), self.rotary(k)
        y = causal_linear_attention(self._features(q, True), self._features(k, False), v.float(), self.chunk)
        return merge_heads(y.to(qkv.dtype))


def build_attention(cfg, rotary: nn.Module) -> nn.Module:
    """The causal attention module for `cfg.attention` (not "softmax", which stays in `DenseAttention`)."""
    if cfg.attention == "linformer":
        return LinformerAttention(cfg.n_head, cfg.max_seq_len, cfg.linformer_k, rotary)
    if cfg.attention == "cosformer":
        return CosFormerAttention(cfg.n_head, cfg.max_seq_len)
    if cfg.attention == "performer":
        return PerformerAttention(cfg.n_head, cfg.head_dim, cfg.performer_features, rotary)
    raise ValueError(f"attention: expected one of {ATTENTIONS[1:]}, got {cfg.attention!r}")
