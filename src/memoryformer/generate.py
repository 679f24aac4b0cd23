"""Sampling text from a trained model (greedy, temperature, top-k, top-p) from a static KV cache."""

from __future__ import annotations

import contextlib
import math

import torch

from memoryformer.model import KVCache
from memoryformer.ops import cpu_ext


def _check(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) next token ids.

    Greedy at temperature 0. Otherwise the candidates are the `top_k` most likely tokens (renormalised), or every
    token; `top_p` keeps the smallest set of the most likely of them whose probability reaches top_p. One uniform
    draw from `generator` then picks a candidate by its cumulative probability. Nothing sorts the vocabulary: the
    nucleus is looked for among the 256 most likely tokens first and, when it is larger (a nearly flat
    distribution), found as a probability threshold by bisection; a step costs about a millisecond or less at a
    50k vocabulary, where a full sort costs ~8 ms.
    """
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    nucleus = top_p is not None and top_p < 1
    idx = None
    if top_k is not None or nucleus:
        vals, idx = torch.topk(logits, min(top_k or 256, logits.shape[-1]))  # most likely first
        probs = vals.softmax(-1) if top_k is not None else (vals - logits.logsumexp(-1, keepdim=True)).exp()
        if nucleus and (top_k is not None or bool((probs.sum(-1) >= top_p).all())):
            drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
            probs = probs.masked_fill(drop, 0.0)
        elif nucleus:
            idx, probs = None, _threshold(logits.softmax(-1), top_p)
    else:
        probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)
    dev = generator.device if generator is not None else probs.device
    u = torch.rand((probs.shape[0], 1), generator=generator, device=dev).to(probs.device) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
    bad = probs.gather(-1, pick) <= 0  # rounding past the last candidate: the likeliest one
    pick = torch.where(bad, probs.argmax(-1, keepdim=True), pick)
    return (pick if idx is None else idx.gather(-1, pick)).to(logits.device)


def _threshold(probs: torch.Tensor, top_p: float, steps: int = 24) -> torch.Tensor:
    """probs with every token below each row's threshold t zeroed, t the largest for which the tokens >= t hold
    top_p of the mass (the nucleus, up to ties at t), by bisection."""
    lo = torch.zeros_like(probs[:, :1])
    hi = probs.max(-1, keepdim=True).values
    for _ in range(steps):
        mid = (lo + hi) / 2
        enough = (probs * (probs >= mid)).sum(-1, keepdim=True) >= top_p
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
    return probs * (probs >= lo)


def _engine(model, idx: torch.Tensor, kv_cache: bool, engine: bool | None):
    """The decode engine to use, or None (eager)."""
    if engine is False or not kv_cache:
        return None
    from memoryformer import inference

    if engine is None and not (idx.device.type == "cpu" and inference.frozen(model)):
        return None
    found = inference.engine_for(model, idx.shape[0]) if idx.device.type == "cpu" else None
    if found is None and engine:
        why = "idx is not on the CPU" if idx.device.type != "cpu" else (
            inference.DecodeEngine.why_not(model) or "the compiled CPU kernels are unavailable")
        raise ValueError(f"engine: the decode engine cannot run this model ({why})")
    return found


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
    engine: bool | None = None,
) -> torch.Tensor:
    """Extend idx (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    temperature 0 is greedy. The context is cropped to the model's `max_seq_len`. Generation stops early once every
    row has produced `eos_token`. With `kv_cache` (softmax-attention models) the prompt fills a preallocated
    `KVCache` and each new token runs through the model alone; once the sequence outgrows `max_seq_len` the window
    slides and every step re-reads the cropped window, exactly as without the cache.

    `engine`: decode through the compiled CPU engine (`memoryformer.inference.DecodeEngine`: the whole step in one
    C++ call over a static cache, the same numbers up to float rounding). None (default): when the model is frozen
    for inference (`memoryformer.load(path, tables="int8")`, `memoryformer.freeze`) and the engine can run it; True: always
    (an error if it cannot); False: never (the eager model, the reference). `stream` yields the same tokens one
    step at a time.
    """
    new = list(stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_token=eos_token, generator=generator, kv_cache=kv_cache, engine=engine))
    return torch.cat([idx, *new], dim=1)


def _check_ids(model: torch.nn.Module, idx: torch.Tensor, eos_token: int | None) -> None:
    V = model.config.vocab_size
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx: expected a (B, T) tensor of token ids with T >= 1, got shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx: expected integer token ids, got {str(idx.dtype).removeprefix('torch.')}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"idx: token ids must lie in [0, {V}) (the model's vocab_size), got {lo if lo < 0 else hi}")
    if eos_token is not None and (isinstance(eos_token, bool) or not isinstance(eos_token, int)
                                  or not 0 <= eos_token < V):
        raise ValueError(f"eos_token: expected a token id in [0, {V}) or None, got {eos_token!r}")


def stream(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, eos_token: int | None = None,
           generator: torch.Generator | None = None, kv_cache: bool = True, engine: bool | None = None):
    """`generate`, one step at a time: an iterator over each step's (B, 1) new tokens as they are sampled (rows that
    have finished repeat `eos_token`), ending after `max_new_tokens` steps or once every row has produced
    `eos_token`. Arguments are checked here, before the first token."""
    _check(max_new_tokens, temperature, top_k, top_p)
    _check_ids(model, idx, eos_token)
    fast = _engine(model, idx, kv_cache, engine)
    cache = KVCache.for_model(model, idx.shape[0]) if fast is None and kv_cache and model.supports_kv_cache() else None
    return _steps(model, idx, max_new_tokens, fast, cache, (temperature, top_k, top_p, generator), eos_token)


@torch.no_grad()
def _steps(model, idx, max_new_tokens: int, fast, cache, sampling: tuple, eos_token: int | None):
    temperature, top_k, top_p, generator = sampling
    max_len = model.config.max_seq_len
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        if fast is not None and idx.shape[1] <= max_len:
            logits = fast.prefill(idx) if i == 0 else fast.step(idx[:, -1])
        elif cache is not None and idx.shape[1] <= max_len:
            hidden = model.hidden(idx[:, cache.length :], cache=cache)
            logits = model.head(hidden[:, -1]).float()  # (B, V)
        else:
            logits = model(idx[:, -max_len:])[0][:, -1].float()
        with cpu_ext.torch_serial() if fast is not None else contextlib.nullcontext():
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eos_token is not None:
            nxt = nxt.masked_fill(done[:, None], eos_token)
            done |= nxt[:, 0] == eos_token
        idx = torch.cat([idx, nxt], dim=1)
        yield nxt
        if eos_token is not None and done.all():
            return
