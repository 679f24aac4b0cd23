"""Scoring continuations as lm-evaluation-harness's `loglikelihood` does, and the zero-shot metrics.

Scoring follows lm-eval exactly: trailing spaces of the context move to the continuation, the pair is tokenized whole
and split at the context's length, an empty context becomes <|endoftext|>, and a pair longer than the model's window
keeps its last max_seq_len + 1 tokens. Speed on CPU comes from four things that do not change a number: the LM head
runs only where a continuation token is scored, and once per distinct hidden state (the choices of a question share
the context's last state and any common prefix), in chunks whose logits stay in cache; rows are sorted by length so
batches pad little; and the choices of one question share one pass over their common context, whose keys and values
they then read from a KV cache (softmax-attention models; others score every choice in full).
"""

from __future__ import annotations

import math
import os
import time
from typing import Iterable

import torch

from memoryformer.config import MemoryFormerError
from memoryformer.data import EOT_ID
from memoryformer.evaluate.tasks import PAPER_TASKS, TASKS, Doc, load_docs, parse_tasks, task_file
from memoryformer.model import KVCache

HEAD_ROWS = 64  # positions per LM-head call on CPU: (64, vocab) fp32 logits stay in cache for the logsumexp
HEAD_ROWS_GPU = 1024  # on GPUs larger calls fill the device (bounds the logits to 200 MB)

# ---------------------------------------------------------------------------------------------------------------
# Tokenization (lm-eval's rule for a causal model)


def get_tokenizer():
    from memoryformer.data import get_tokenizer as bundled

    return bundled()


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's TemplateLM.loglikelihood makes them."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    if context == "":
        cont = enc(continuation)
        return ([EOT_ID], cont) if cont[0] != EOT_ID else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx) :]


# ---------------------------------------------------------------------------------------------------------------
# Scoring: sum of log p(continuation | context) and whether every continuation token is the argmax

def _score_positions(model, hidden: torch.Tensor, targets: torch.Tensor, greedy: bool = True,
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and is-argmax of `targets` (N,) predicted from hidden states (U, d) -> ((N,), (N,)).

    `rows` (N,) names the hidden row of each target (default: row i for target i), so a position that predicts
    several targets (the first token of every choice of one question, or choices that start alike) runs through
    the LM head once.
    """
    U, N = hidden.shape[0], targets.shape[0]
    chunk = HEAD_ROWS if hidden.device.type == "cpu" else HEAD_ROWS_GPU
    rows = torch.arange(N, device=targets.device) if rows is None else rows
    order = torch.argsort(rows, stable=True)
    r_sorted, t_sorted = rows[order], targets[order]
    starts = torch.arange(0, U + chunk, chunk, device=rows.device).clamp_(max=U)
    bounds = torch.searchsorted(r_sorted, starts).tolist()
    lp_sorted = torch.empty(N, dtype=torch.float32, device=targets.device)
    hit_sorted = torch.zeros(N, dtype=torch.bool, device=targets.device)
    # small chunks keep the (rows, vocab) logits in cache while logsumexp reads them back; logit - logsumexp
    # rather than log_softmax: no second (rows, vocab) tensor to write and read
    for j, i in enumerate(range(0, U, chunk)):
        a, b = bounds[j], bounds[j + 1]
        if a == b:
            continue
        logits = model.head(hidden[i : i + chunk]).float()  # (n, V)
        local, t = r_sorted[a:b] - i, t_sorted[a:b]
        lp_sorted[a:b] = logits[local, t] - torch.logsumexp(logits, dim=-1)[local]
        if greedy:  # argmax costs as much again; only LAMBADA's accuracy needs it
            hit_sorted[a:b] = logits.argmax(-1)[local] == t
    lp, hit = torch.empty_like(lp_sorted), torch.empty_like(hit_sorted)
    lp[order], hit[order] = lp_sorted, hit_sorted
    return lp, hit

def _plain_rows(model, rows: list[tuple[list[int], int]], device, greedy: bool = True) -> list[tuple[float, bool]]:
    """rows: (input+target ids, number of scored tokens at the end). One padded batch, causal, right-padded."""
    T = max(len(r) - 1 for r, _ in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, _) in enumerate(rows):
        idx[i, : len(r) - 1] = torch.tensor(r[:-1])
    hidden = model.hidden(idx.to(device))  # (B, T, d)
    sel_b, sel_t, tgt = [], [], []
    for i, (r, n) in enumerate(rows):
        L = len(r) - 1
        sel_b += [i] * n
        sel_t += range(L - n, L)
        tgt += r[-n:]
    lp, hit = _score_positions(model, hidden[sel_b, sel_t], torch.tensor(tgt, device=device), greedy)
    out, k = [], 0
    for _, n in rows:
        out.append((lp[k : k + n].sum().item(), bool(hit[k : k + n].all())))
        k += n
    return out


# Shared-context scoring: one cached pass over each question's context, then every choice attends to its keys and
# values in a KVCache. `test_evaluate.py` checks the result against one full forward per choice.


def _supports_shared_context(model) -> bool:
    return hasattr(model, "supports_kv_cache") and model.supports_kv_cache()


def _shared_groups(model, groups: list[tuple[list[int], list[list[int]]]], device,
                   greedy: bool = True) -> list[list[tuple[float, bool]]]:
    """groups: (context ids, [continuation ids per choice]); every context + continuation fits the window."""
    G = len(groups)
    C = [len(c) for c, _ in groups]
    Cmax = max(C)
    idx = torch.zeros(G, Cmax, dtype=torch.long)
    for g, (c, _) in enumerate(groups):
        idx[g, : len(c)] = torch.tensor(c)
    rows = [(g, cont) for g, (_, conts) in enumerate(groups) for cont in conts]
    S = max(1, max(len(cont) - 1 for _, cont in rows))
    valid = (torch.arange(Cmax)[None, :] < torch.tensor(C)[:, None]).to(device)  # (G, Cmax): right padding
    cache = KVCache.for_model(model, G, capacity=Cmax + S)
    hidden_c = model.hidden(idx.to(device), cache=cache, valid=valid)  # padding never reaches real tokens
    last_c = hidden_c[torch.arange(G), torch.tensor(C) - 1]  # (G, d): predicts every choice's first token

    sidx = torch.zeros(len(rows), S, dtype=torch.long)
    spos = torch.zeros(len(rows), S, dtype=torch.long)
    for r, (g, cont) in enumerate(rows):
        sidx[r, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
        spos[r] = C[g] + torch.arange(S)
    # padded tail positions may run past the rotary table; they are never scored, so clamp them
    spos.clamp_(max=model.config.max_seq_len - 1)
    need_suffix = S > 1 or any(len(cont) > 1 for _, cont in rows)
    hidden_s = None
    if need_suffix:  # every choice continues its group's context: the cache's rows, once per choice
        choices = cache.rows(torch.tensor([g for g, _ in rows], device=device))
        hidden_s = model.hidden(sidx.to(device), cache=choices, pos=spos.to(device))

    # every scored token is predicted by the hidden state at (its group, the choice's tokens before it): choices
    # share the context's last state and any common prefix, so score each distinct state once
    d = last_c.shape[-1]
    flat = last_c if hidden_s is None else torch.cat((last_c, hidden_s.reshape(-1, d)))
    key_row: dict[tuple, int] = {}
    src, row_of, tgt, counts = [], [], [], []
    for r, (g, cont) in enumerate(rows):
        for j in range(len(cont)):
            key = (g, *cont[:j])
            if key not in key_row:
                key_row[key] = len(src)
                src.append(g if j == 0 else G + r * S + j - 1)
            row_of.append(key_row[key])
        tgt += cont
        counts.append(len(cont))
    lp, hit = _score_positions(model, flat[torch.tensor(src, device=device)], torch.tensor(tgt, device=device), greedy,
                               torch.tensor(row_of, device=device))
    out, k, r = [], 0, 0
    for _, conts in groups:
        res = []
        for _ in conts:
            n = counts[r]
            res.append((lp[k : k + n].sum().item(), bool(hit[k : k + n].all())))
            k, r = k + n, r + 1
        out.append(res)
    return out


@torch.inference_mode()
def loglikelihood_groups(
    model,
    groups: list[tuple[list[int], list[list[int]]]],
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "scoring",
    greedy: bool = True,
) -> list[list[tuple[float, bool]]]:
    """Score continuations: groups of (context ids, [continuation ids, ...]) -> per group [(log-likelihood, greedy)].

    `batch_size` bounds the sequences per forward pass (contexts and choices each count one). `greedy=False`
    skips the is-greedy check (then always False), which multiple-choice accuracy does not use.
    """
    from tqdm.auto import tqdm

    max_len = model.config.max_seq_len
    shared_ok = _supports_shared_context(model)
    results: list[list[tuple[float, bool] | None]] = [[None] * len(conts) for _, conts in groups]
    shared, plain = [], []  # (group index, ...) work items
    for gi, (ctx, conts) in enumerate(groups):
        if any(len(c) == 0 for c in conts):
            # BPE merged the whole continuation into the context's last token: nothing to score (lm-eval: 0, greedy)
            for ci, c in enumerate(conts):
                if not c:
                    results[gi][ci] = (0.0, True)
            if all(len(c) == 0 for c in conts):
                continue
            keep = [ci for ci, c in enumerate(conts) if c]
            for ci in keep:
                plain.append((gi, ci, (ctx + conts[ci])[-(max_len + 1) :], len(conts[ci])))
            continue
        if any(len(c) > max_len for c in conts):
            raise MemoryFormerError(f"a continuation of {max(map(len, conts))} tokens exceeds max_seq_len={max_len}")
        fits = all(len(ctx) + len(c) - 1 <= max_len for c in conts)
        if shared_ok and fits and len(conts) > 1:
            shared.append(gi)
        else:
            for ci, c in enumerate(conts):
                plain.append((gi, ci, (ctx + c)[-(max_len + 1) :], len(c)))  # lm-eval's left truncation
    # progress in tokens, updated once per forward pass: longest rows come first, so counting rows (or updating
    # per row of a finished batch) made the first estimate many times too long
    cost = {g: len(groups[g][0]) + sum(map(len, groups[g][1])) for g in shared}
    total = sum(cost.values()) + sum(len(w[2]) for w in plain)
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress, leave=False)

    # choices outnumber contexts, so padding is smallest when batches hold equally long choices first
    shared.sort(key=lambda g: (-max(map(len, groups[g][1])), -len(groups[g][0])))
    i = 0
    while i < len(shared):
        batch, rows = [], 0
        while i < len(shared) and (not batch or rows + 1 + len(groups[shared[i]][1]) <= batch_size):
            batch.append(shared[i])
            rows += 1 + len(groups[shared[i]][1])
            i += 1
        for g, res in zip(batch, _shared_groups(model, [groups[g] for g in batch], device, greedy)):
            results[g] = res
        bar.update(sum(cost[g] for g in batch))

    plain.sort(key=lambda w: -len(w[2]))
    for j in range(0, len(plain), batch_size):
        chunk = plain[j : j + batch_size]
        for (gi, ci, _, _), res in zip(chunk, _plain_rows(model, [(r, n) for _, _, r, n in chunk], device, greedy)):
            results[gi][ci] = res
        bar.update(sum(len(w[2]) for w in chunk))
    bar.close()
    return results  # type: ignore[return-value]


def loglikelihood(model, tokenizer, pairs: list[tuple[str, str]], **kw) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood` for (context, continuation) string pairs, each scored on its own."""
    groups = [(c, [k]) for c, k in (encode_pair(tokenizer, a, b) for a, b in pairs)]
    return [g[0] for g in loglikelihood_groups(model, groups, **kw)]


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks


def _metrics(task: str, docs: list[Doc], scores: list[list[tuple[float, bool]]]) -> dict:
    spec = TASKS[task]
    n = len(docs)
    out: dict = {"acc": None, "acc_norm": None, "n": n}
    if task == "lambada_openai":
        lls = [s[0][0] for s in scores]
        out["acc"] = sum(s[0][1] for s in scores) / n
        out["ppl"] = math.exp(-sum(lls) / n)
        return out
    acc = acc_norm = 0
    for d, s in zip(docs, scores):
        lls = [x[0] for x in s]
        # first index of the maximum, as numpy.argmax
        acc += max(range(len(lls)), key=lambda i: (lls[i], -i)) == d.gold
        normed = [ll / len(c) for ll, c in zip(lls, d.choices)]
        acc_norm += max(range(len(normed)), key=lambda i: (normed[i], -i)) == d.gold
    out["acc"] = acc / n
    if "acc_norm" in spec.metrics:
        out["acc_norm"] = acc_norm / n
    return out


def _check_labels(task: str, docs: list[Doc], data_dir) -> None:
    """A gold label outside the example's choices would score as a miss everywhere: name the example instead."""
    for i, d in enumerate(docs, 1):
        if isinstance(d.gold, bool) or not isinstance(d.gold, int) or not 0 <= d.gold < len(d.pairs):
            raise MemoryFormerError(f"{task_file(task, data_dir)}: example {i} has label {d.gold!r}, but it has "
                                    f"{len(d.pairs)} choices (expected 0..{len(d.pairs) - 1})")


def evaluate_tasks(
    model,
    tasks: str | Iterable[str] | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    tokenizer=None,
) -> dict[str, dict]:
    """Zero-shot scores: {task: {"acc", "acc_norm" (None where lm-eval reports none), "n"[, "ppl"]}}."""
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise MemoryFormerError(f"limit: expected a positive number of examples, got {limit}")
    loaded = {t: load_docs(t, data_dir, limit) for t in names}  # fail on a missing file before any scoring
    for t, docs in loaded.items():
        _check_labels(t, docs, data_dir)
    tokenizer = tokenizer or get_tokenizer()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    try:
        for task, docs in loaded.items():
            t0 = time.perf_counter()
            groups, spans = [], []  # spans[i]: the group indices of docs[i]
            for d in docs:
                enc = [encode_pair(tokenizer, c, k) for c, k in d.pairs]
                if all(e[0] == enc[0][0] for e in enc):
                    spans.append([len(groups)])
                    groups.append((enc[0][0], [e[1] for e in enc]))
                else:  # winogrande: one context per choice
                    spans.append(list(range(len(groups), len(groups) + len(enc))))
                    groups += [(e[0], [e[1]]) for e in enc]
            flat = loglikelihood_groups(model, groups, batch_size=batch_size, device=device, progress=progress,
                                        desc=task, greedy=task == "lambada_openai")
            scores = [[s for g in span for s in flat[g]] for span in spans]
            out[task] = _metrics(task, docs, scores)
            out[task]["seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        model.train(was_training)
    return out


def format_results(results: dict[str, dict]) -> str:
    lines = [f"{'task':<16}{'n':>7}{'acc':>9}{'acc_norm':>10}{'ppl':>10}{'time':>8}"]
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for task, r in results.items():
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") is not None else "-"
        lines.append(f"{task:<16}{r['n']:>7}{f(r['acc']):>9}{f(r['acc_norm']):>10}{ppl:>10}{r.get('seconds', 0):>7.1f}s")
    paper = [results[t]["acc"] for t in PAPER_TASKS if t in results]
    if len(paper) == len(PAPER_TASKS):
        lines.append(f"{'avg (paper six)':<16}{'':>7}{sum(paper) / len(paper):>9.4f}")
    return "\n".join(lines)
