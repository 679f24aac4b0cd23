"""Sampling text from a trained model (temperature, top-k, top-p), with a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
) -> torch.Tensor:
    """Extend idx (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    temperature 0 is greedy. The context is cropped to the model's `max_seq_len`. Generation stops early once
    every row has produced `eos_token`. With `kv_cache` (softmax-attention models) each new token runs through the
    model alone, attending to cached keys and values; once the sequence outgrows `max_seq_len` the window slides
    and every step re-reads the cropped window, exactly as without the cache.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p}")
    max_len = model.config.max_seq_len
    use_cache = kv_cache and hasattr(model, "forward_cached") and model.supports_kv_cache()
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache, fed = None, 0  # fed: tokens of idx already in the cache
    for _ in range(max_new_tokens):
        if use_cache and idx.shape[1] <= max_len:
            new = idx[:, fed:]
            pos = torch.arange(fed, idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
            hidden, kvs = model.forward_cached(new, pos, cache)
            cache = kvs if cache is None else [(torch.cat((pk, k), 2), torch.cat((pv, v), 2))
                                               for (pk, pv), (k, v) in zip(cache, kvs)]
            fed = idx.shape[1]
            logits = model.head(hidden[:, -1, :]).float()  # (B, V)
        else:
            logits, _ = model(idx[:, -max_len:])
            logits = logits[:, -1, :].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p is not None and top_p < 1:
                sorted_logits, order = logits.sort(-1, descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
                logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
            probs = F.softmax(logits, -1)
            if generator is not None and generator.device != probs.device:
                probs = probs.to(generator.device)  # sample where the generator lives, so seeds mean the same
            nxt = torch.multinomial(probs, 1, generator=generator).to(idx.device)  # (B, 1)
        if eos_token is not None:
            nxt = nxt.masked_fill(done[:, None], eos_token)
            done |= nxt[:, 0] == eos_token
        idx = torch.cat([idx, nxt], dim=1)
        if eos_token is not None and done.all():
            break
    return idx
