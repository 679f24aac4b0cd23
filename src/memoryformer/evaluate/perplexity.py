"""Perplexity: the one implementation behind training's validation, `memoryformer eval --data` and the benchmarks.

Windows of seq_len + 1 tokens are cut from a token stream at fixed starts (`data.eval_starts`: consecutive when the
text is short, else spread evenly over it so every book counts); each window predicts its last seq_len tokens. The
same model, text and token budget give the same number wherever it is computed.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from memoryformer import data as data_mod
from memoryformer.config import MemoryFormerError


@torch.no_grad()
def window_nll(model, tokens: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int,
               device: torch.device | str, autocast=None, progress: bool = False) -> tuple[float, int]:
    """(sum of next-token cross-entropies in nats, number of predicted tokens) over the windows
    tokens[s : s + seq_len + 1] for s in `starts`, `batch_size` windows per forward."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in tqdm(range(0, len(starts), batch_size), desc="perplexity", unit="batch", disable=not progress,
                      leave=False):
            w = data_mod.windows(tokens, starts[i : i + batch_size], seq_len + 1).to(device)
            with autocast if autocast is not None else contextlib.nullcontext():
                _, loss = model(w[:, :-1], w[:, 1:])
            n = w[:, 1:].numel()
            nll += loss.item() * n
            count += n
    finally:
        model.train(was_training)
    return nll, count


def perplexity(model, data: str, *, max_tokens: int | None = None, seq_len: int | None = None, batch_size: int = 8,
               device: str | torch.device | None = None, progress: bool = True, cache_dir=None) -> dict:
    """Perplexity of `model` on a text source (a .jsonl[.xz|.gz] / .txt file, a folder, "sample" for the bundled
    validation books, hf:NAME): {"ppl", "nll", "tokens", "windows", "seq_len"}. `max_tokens` bounds the tokens scored
    (windows spread over the text, as training's validation); None scores all of it in consecutive windows."""
    seq_len = seq_len or model.config.max_seq_len
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise MemoryFormerError(f"seq-len: expected 1..{model.config.max_seq_len} (the model's max_seq_len), got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise MemoryFormerError(f"max-tokens: expected a positive number, got {max_tokens}")
    tokens = data_mod.text_tokens(data, cache_dir=cache_dir, progress=progress)
    if len(tokens) < seq_len + 1:
        seq_len = len(tokens) - 1  # a short text: one window of all of it
        if seq_len < 1:
            raise MemoryFormerError(f"data: {data}: fewer than 2 tokens of text")
    starts = data_mod.eval_starts(len(tokens), seq_len, max_tokens or len(tokens))
    device = device or next(model.parameters()).device
    nll, n = window_nll(model, tokens, starts, seq_len, batch_size, device, progress=progress)
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "windows": len(starts), "seq_len": seq_len}
