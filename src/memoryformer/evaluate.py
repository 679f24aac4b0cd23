"""Zero-shot benchmarks with lm-evaluation-harness's prompts and metrics, and perplexity of a text file.

Tasks (files from the benchmark folder, field names as in lm-eval's own datasets):
- piqa, arc_easy, arc_challenge, logiqa: "acc" and "acc_norm" (log-likelihood divided by the choice's characters);
- winogrande (partial scoring: the shared continuation after each filled-in context) and SuperGLUE wsc: "acc";
- lambada_openai: "acc" (the last word is the greedy continuation) and "ppl" = exp(-mean log-likelihood of it).

Scoring follows lm-eval's `loglikelihood` exactly: trailing spaces of the context move to the continuation, the pair is
tokenized whole and split at the context's length, an empty context becomes <|endoftext|>, and a pair longer than
the model's window keeps its last max_seq_len + 1 tokens. Speed on CPU comes from four things that do not change a
number: the LM head runs only where a continuation token is scored, and once per distinct hidden state (the choices of
a question share the context's last state and any common prefix), in chunks whose logits stay in cache; rows are
sorted by length so batches pad little; and the choices of one question share one pass over their common context,
whose attention keys and values they then reuse (softmax-attention models; others score every choice in full).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from memoryformer.config import MemoryFormerError

PAPER_TASKS = ("piqa", "winogrande", "wsc", "arc_easy", "arc_challenge", "logiqa")
ALL_TASKS = PAPER_TASKS + ("lambada_openai",)
ALIASES = {"lambada": "lambada_openai", "superglue_wsc": "wsc", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge"}
EOT_ID = 0  # <|endoftext|>: lm-eval's prefix token for an empty context
HEAD_ROWS = 64  # positions per LM-head call on CPU: (64, vocab) fp32 logits stay in cache for the logsumexp
HEAD_ROWS_GPU = 1024  # on GPUs larger calls fill the device (bounds the logits to 200 MB)


@dataclass
class Doc:
    """One example: a (context, continuation) string pair per choice, the gold index, and the choice strings whose
    character lengths normalise `acc_norm` (lm-eval's `doc_to_choice`)."""

    pairs: list[tuple[str, str]]
    gold: int
    choices: list[str]


# ---------------------------------------------------------------------------------------------------------------
# Prompts: the standard lm-eval task definitions, zero-shot, target delimiter " ".


def _detokenize(s: str) -> str:
    # lm-eval's general_detokenize, which its SuperGLUE WSC prompt applies to the passage
    s = s.replace(" n't", "n't").replace(" )", ")").replace("( ", "(").replace('" ', '"').replace(' "', '"')
    return re.sub(r" (['.,])", r"\1", s)


def _piqa(d):
    return Doc([(f"Question: {d['goal']}\nAnswer:", " " + s) for s in (d["sol1"], d["sol2"])], int(d["label"]),
               [d["sol1"], d["sol2"]])


def _arc(d):
    ctx = f"Question: {d['question']}\nAnswer:"
    texts = d["choices"]["text"]
    return Doc([(ctx, " " + t) for t in texts], d["choices"]["label"].index(d["answerKey"]), list(texts))


def _logiqa(d):
    prompt = f"Passage: {d['context']}\nQuestion: {d['question']}\nChoices:\n"
    prompt += "".join(f"{c}. {o}\n" for c, o in zip("ABCD", d["options"])) + "Answer:"
    return Doc([(prompt, " " + o) for o in d["options"]], "abcd".index(d["label"].strip()), list(d["options"]))


def _winogrande(d):
    # multiple-input mode: the choices are the contexts, the continuation is shared
    return Doc([(c, " " + d["continuation"]) for c in d["contexts"]], int(d["label"]), list(d["contexts"]))


def _wsc(d):
    # span indices are word indices into the whitespace-split passage
    text = d["text"]
    pre = " ".join(text.split()[: d["span2_index"]])
    post = text[len(pre) + len(d["span2_text"]) + 1 :]
    passage = _detokenize(pre + f" *{d['span2_text']}*" + post)
    ctx = (f"Passage: {passage}\n"
           f"Question: In the passage above, does the pronoun \"*{d['span2_text']}*\" refer to \"*{d['span1_text']}*\"?\n"
           "Answer:")
    return Doc([(ctx, " no"), (ctx, " yes")], int(d["label"]), ["no", "yes"])


def _lambada(d):
    words = d["text"].split(" ")
    return Doc([(" ".join(words[:-1]), " " + words[-1])], 0, [words[-1]])


@dataclass(frozen=True)
class TaskSpec:
    file: str
    build: Callable[[dict], Doc]
    metrics: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa_validation.jsonl", _piqa, ("acc", "acc_norm")),
    "winogrande": TaskSpec("winogrande_partial.jsonl", _winogrande, ("acc",)),
    "wsc": TaskSpec("superglue_wsc_val.jsonl", _wsc, ("acc",)),
    "arc_easy": TaskSpec("arc_easy_test.jsonl", _arc, ("acc", "acc_norm")),
    "arc_challenge": TaskSpec("arc_challenge_test.jsonl", _arc, ("acc", "acc_norm")),
    "logiqa": TaskSpec("logiqa_test.jsonl", _logiqa, ("acc", "acc_norm")),
    "lambada_openai": TaskSpec("lambada_openai_test.jsonl", _lambada, ("acc", "ppl")),
}


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """Task names from "a,b,c" or a list; None -> the paper's six; "all" -> those + lambada_openai."""
    if tasks is None:
        return list(PAPER_TASKS)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    out: list[str] = []
    for name in names:
        if name == "all":
            out += [t for t in ALL_TASKS if t not in out]
            continue
        key = ALIASES.get(name.lower(), name.lower())
        if key not in TASKS:
            raise MemoryFormerError(f"tasks: unknown task {name!r} (valid: {', '.join(ALL_TASKS)}, lambada, all)")
        if key not in out:
            out.append(key)
    if not out:
        raise MemoryFormerError(f"tasks: no task given (valid: {', '.join(ALL_TASKS)}, lambada, all)")
    return out


def default_data_dir() -> Path | None:
    """$MEMORYFORMER_EVAL_DIR, else ../shared/data/eval from the working directory or from the source checkout."""
    env = os.environ.get("MEMORYFORMER_EVAL_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for cand in (Path.cwd() / "../shared/data/eval", here.parents[3] / "shared/data/eval" if len(here.parents) > 3 else None):
        if cand is not None and cand.is_dir():
            return cand.resolve()
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if path is None:
        raise MemoryFormerError(
            "data-dir: no benchmark folder found; pass --data-dir DIR (files named as in ../shared/data/eval, "
            f"e.g. {TASKS['piqa'].file}) or set MEMORYFORMER_EVAL_DIR"
        )
    if not path.is_dir():
        raise MemoryFormerError(f"data-dir: {path} is not a folder")
    return path


def task_file(task: str, data_dir: str | os.PathLike | None = None) -> Path:
    path = resolve_data_dir(data_dir) / TASKS[task].file
    if not path.is_file():
        raise MemoryFormerError(f"{task}: benchmark file {path} not found")
    return path


def load_docs(task: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Doc]:
    """The first `limit` examples of `task` (all when None), in file order."""
    path, spec = task_file(task, data_dir), TASKS[task]
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                docs.append(spec.build(json.loads(line)))
            except (json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as e:
                raise MemoryFormerError(f"{path}:{lineno}: not a {task} example ({type(e).__name__}: {e})") from None
    return docs


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


def _final_hidden(model, idx: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, d) final-norm hidden states: the model's forward without its LM head."""
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


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
    hidden = _final_hidden(model, idx.to(device))  # (B, T, d)
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


# Shared-context scoring: one cached pass over each question's context (`forward_cached`), then every choice
# attends to its keys/values. `test_evaluate.py` checks the result against one full forward per choice.


def _supports_shared_context(model) -> bool:
    return hasattr(model, "forward_cached") and model.supports_kv_cache()


def _shared_groups(model, groups: list[tuple[list[int], list[list[int]]]], device,
                   greedy: bool = True) -> list[list[tuple[float, bool]]]:
    """groups: (context ids, [continuation ids per choice]); every context + continuation fits the window."""
    G = len(groups)
    C = [len(c) for c, _ in groups]
    Cmax = max(C)
    idx = torch.zeros(G, Cmax, dtype=torch.long)
    for g, (c, _) in enumerate(groups):
        idx[g, : len(c)] = torch.tensor(c)
    pos = torch.arange(Cmax).expand(G, Cmax)
    hidden_c, kv_c = model.forward_cached(idx.to(device), pos.to(device))  # right padding never reaches real tokens
    last_c = hidden_c[torch.arange(G), torch.tensor(C) - 1]  # (G, d): predicts every choice's first token

    rows = [(g, cont) for g, (_, conts) in enumerate(groups) for cont in conts]
    S = max(1, max(len(cont) - 1 for _, cont in rows))
    sidx = torch.zeros(len(rows), S, dtype=torch.long)
    spos = torch.zeros(len(rows), S, dtype=torch.long)
    for r, (g, cont) in enumerate(rows):
        sidx[r, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
        spos[r] = C[g] + torch.arange(S)
    # padded tail positions may run past the rotary table; they are never scored, so clamp them
    spos.clamp_(max=model.config.max_seq_len - 1)
    owner = torch.tensor([g for g, _ in rows], device=device)
    past = [(k.index_select(0, owner), v.index_select(0, owner)) for k, v in kv_c]
    valid = (torch.arange(Cmax)[None, :] < torch.tensor(C)[:, None]).to(device).index_select(0, owner)
    need_suffix = S > 1 or any(len(cont) > 1 for _, cont in rows)
    hidden_s = model.forward_cached(sidx.to(device), spos.to(device), past, valid)[0] if need_suffix else None

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
    total = sum(len(groups[g][1]) for g in shared) + len(plain)
    bar = tqdm(total=total, desc=desc, unit="seq", disable=not progress, leave=False)

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
            bar.update(len(res))

    plain.sort(key=lambda w: -len(w[2]))
    for j in range(0, len(plain), batch_size):
        chunk = plain[j : j + batch_size]
        for (gi, ci, _, _), res in zip(chunk, _plain_rows(model, [(r, n) for _, _, r, n in chunk], device, greedy)):
            results[gi][ci] = res
        bar.update(len(chunk))
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


# ---------------------------------------------------------------------------------------------------------------
# Perplexity


def _text_tokens(path: str, max_tokens: int | None, tokenizer) -> list[int]:
    """Token ids of a JSONL(.xz/.gz) / .txt file ("sample" = the bundled validation sample), each document
    followed by <|endoftext|>; stops once `max_tokens` + 1 are read."""
    from memoryformer import data

    files = [data.SAMPLE_FILES["val"]] if path == data.SAMPLE else [Path(path)]
    if not files[0].exists():
        raise MemoryFormerError(f"data: {path}: no such file")
    if files[0].is_dir():
        files = sorted(p for p in files[0].iterdir() if p.name.endswith(data.TEXT_SUFFIXES))
        if not files:
            raise MemoryFormerError(f"data: {path}: no text files ({', '.join(data.TEXT_SUFFIXES)}) in this folder")
    ids: list[int] = []
    for f in files:
        for doc in data.read_documents(f):
            ids += tokenizer.encode(doc, add_special_tokens=False).ids + [EOT_ID]
            if max_tokens is not None and len(ids) > max_tokens:
                return ids[: max_tokens + 1]
    return ids


@torch.inference_mode()
def perplexity(
    model,
    path: str,
    *,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    tokenizer=None,
) -> dict:
    """{"ppl", "tokens", "nll"}: every token after the first predicted once, in non-overlapping windows of seq_len."""
    from tqdm.auto import tqdm

    seq_len = seq_len or model.config.max_seq_len
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise MemoryFormerError(f"seq-len: expected 1..{model.config.max_seq_len} (the model's max_seq_len), got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise MemoryFormerError(f"max-tokens: expected a positive number, got {max_tokens}")
    ids = _text_tokens(path, max_tokens, tokenizer or get_tokenizer())
    if len(ids) < 2:
        raise MemoryFormerError(f"data: {path}: fewer than 2 tokens of text")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    stream = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(ids) - 1, seq_len))
    nll, count = 0.0, 0
    try:
        for j in tqdm(range(0, len(starts), batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
            chunk = [stream[s : s + seq_len + 1] for s in starts[j : j + batch_size]]
            T = max(len(c) for c in chunk) - 1
            idx = torch.zeros(len(chunk), T, dtype=torch.long)
            tgt = torch.full((len(chunk), T), -1, dtype=torch.long)
            for i, c in enumerate(chunk):
                idx[i, : len(c) - 1], tgt[i, : len(c) - 1] = c[:-1], c[1:]
            logits, _ = model(idx.to(device))
            nll += F.cross_entropy(logits.float().flatten(0, 1), tgt.to(device).flatten(), ignore_index=-1,
                                   reduction="sum").item()
            count += int((tgt >= 0).sum())
    finally:
        model.train(was_training)
    return {"ppl": math.exp(nll / count), "tokens": count, "nll": nll / count}


# ---------------------------------------------------------------------------------------------------------------
# Command line: `memoryformer eval`


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder (model.safetensors + config.json)")
    p.add_argument("--tasks", metavar="LIST",
                   help=f"comma-separated: {', '.join(ALL_TASKS)} (alias lambada), or all; default: the paper's six "
                        "(none when only --data is given)")
    p.add_argument("--data", metavar="PATH", help="also report perplexity of this .jsonl[.xz|.gz] / .txt file or folder "
                                                  "(\"sample\": the bundled validation books)")
    p.add_argument("--data-dir", metavar="DIR", help="benchmark folder (default: ../shared/data/eval when present)")
    p.add_argument("--limit", type=int, metavar="N", help="first N examples of each task")
    p.add_argument("--max-tokens", type=int, metavar="N", help="perplexity over at most N tokens of --data")
    p.add_argument("--seq-len", type=int, metavar="N", help="perplexity window (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--tables", choices=("int8", "bfloat16", "float16", "float32"),
                   help="evaluate with the memory tables frozen to this dtype (int8: one scale per row), as "
                        "memoryformer.to_inference does; default: as stored")
    p.add_argument("--harness", choices=("memoryformer", "lm-eval"), default="memoryformer",
                   help="score with our scorer (default) or through lm-evaluation-harness (extra [eval])")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> dict:
    import sys

    from memoryformer.checkpoint import load_model

    tasks = parse_tasks(args.tasks) if (args.tasks or not args.data) else []
    if args.batch_size < 1:
        raise MemoryFormerError(f"batch-size: expected a positive number, got {args.batch_size}")
    if tasks:
        resolve_data_dir(args.data_dir)  # a missing benchmark folder fails before the model loads
    try:
        torch.device(args.device)
    except RuntimeError:
        raise MemoryFormerError(f"device: {args.device!r} is not a torch device (cpu, cuda, cuda:0, ...)") from None
    model = load_model(args.checkpoint, device=args.device)
    if args.tables:
        from memoryformer.layers import to_inference

        to_inference(model, args.tables)
    progress = not args.no_progress
    out: dict = {}
    t0 = time.perf_counter()
    if tasks:
        if args.harness == "lm-eval":
            try:
                from memoryformer.lm_eval_adapter import run_lm_eval
            except ImportError as e:
                raise MemoryFormerError(f"harness lm-eval: {e}") from None
            out = run_lm_eval(model, tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                              device=args.device, progress=progress)
        else:
            out = evaluate_tasks(model, tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                                 device=args.device, progress=progress)
    ppl = None
    if args.data:
        ppl = perplexity(model, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len,
                         batch_size=max(1, args.batch_size // 8), device=args.device, progress=progress)
    if args.json:
        clean = {t: {k: v for k, v in r.items() if k != "seconds"} for t, r in out.items()}
        if ppl is not None:
            ppl_out = {"ppl": ppl["ppl"], "tokens": ppl["tokens"]}
            clean = ppl_out if not clean else {**clean, "perplexity": ppl_out}
        print(json.dumps(clean))
    else:
        if out:
            print(format_results(out))
        if ppl is not None:
            print(f"perplexity of {args.data}: {ppl['ppl']:.3f} over {ppl['tokens']:,} tokens "
                  f"(windows of {args.seq_len or model.config.max_seq_len})")
        print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return {"tasks": out, "perplexity": ppl}
