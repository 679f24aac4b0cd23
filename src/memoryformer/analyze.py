"""Bucket usage of the Memory Layers (paper Figure 4, whose text calls it "generally uniform"): which table rows
the tokens of a text hit.

For every block and every Memory Layer — the fused Q/K/V layer (`attn.qkv`: Q, K and V share one hash, so one set of
histograms covers all three), the Memory Block's `mlp.l1` (tau bits) and `mlp.l2` (tau + expand_bits bits) — a
forward pre-hook hashes the layer's input and counts hits per row of each of its K tables, over `n_tokens` tokens of
validation text. Per table it reports:
- `unused`: the fraction of rows never hit (such rows never receive a gradient, paper Eq. 12);
- `entropy`: the hit distribution's entropy divided by log(rows) (1 = uniform, 0 = one row takes every token);
- `max_over_mean`: hits of the busiest row over the uniform mean (the Figure-4 y-axis peaks, in those units).
It also records the distribution of the differentiable weights ("scores": p(z), or ||z||_1 p(z) for the code
weighting) per layer: mean, std, extremes and percentiles from a log-spaced histogram (`scores.png`). Under the paper
weighting p(z) lies in [2^-tau, 1); weights near 2^-tau mean chunks sitting on their sign boundaries.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from memoryformer.config import MemoryFormerError
from memoryformer.integrity import replace_file, save_figure, write_text


def memory_layers(model) -> dict[str, torch.nn.Module]:
    """{"block{i}.qkv" | ".l1" | ".l2": MemoryLayer} in forward order."""
    from memoryformer.layers import MemoryLayer

    out = {}
    for i, block in enumerate(getattr(model, "blocks", [])):
        for name, mod in (("qkv", getattr(block.attn, "qkv", None)), ("l1", getattr(block.mlp, "l1", None)),
                          ("l2", getattr(block.mlp, "l2", None))):
            if isinstance(mod, MemoryLayer):
                out[f"block{i}.{name}"] = mod
    return out


def table_stats(counts: np.ndarray) -> dict:
    """counts (K, rows) int -> per-table lists and their means."""
    K, rows = counts.shape
    total = counts.sum(1, keepdims=True).clip(min=1)
    p = counts / total
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(p > 0, p * np.log(p), 0.0)).sum(1) / math.log(rows)
    unused = (counts == 0).mean(1)
    peak = counts.max(1) / (total[:, 0] / rows)
    return {
        "rows": rows, "tables": K,
        "unused": [round(float(x), 5) for x in unused],
        "entropy": [round(float(x), 5) for x in ent],
        "max_over_mean": [round(float(x), 3) for x in peak],
        "mean_unused": round(float(unused.mean()), 5),
        "mean_entropy": round(float(ent.mean()), 5),
        "mean_max_over_mean": round(float(peak.mean()), 3),
    }


SCORE_EDGES = np.logspace(-6, 4, 201)  # histogram bins of the weights; values outside go to the end bins


def score_stats(h: dict) -> dict:
    """Summary of one layer's weight histogram {"hist", "n", "sum", "sumsq", "min", "max"}."""
    n = max(h["n"], 1)
    mean = h["sum"] / n
    cdf = np.cumsum(h["hist"]) / n

    def q(p):  # upper edge of the bin where the CDF crosses p (first/last bins: the observed extremes)
        i = int(np.searchsorted(cdf, p))
        return h["min"] if i == 0 else h["max"] if i >= len(SCORE_EDGES) else float(SCORE_EDGES[i])

    return {"mean": round(mean, 6), "std": round(math.sqrt(max(h["sumsq"] / n - mean * mean, 0.0)), 6),
            "min": round(h["min"], 8), "max": round(h["max"], 6),
            "p01": round(q(0.01), 8), "p50": round(q(0.5), 6), "p99": round(q(0.99), 6)}


@torch.inference_mode()
def bucket_counts(model, tokens, *, n_tokens: int = 262_144, seq_len: int | None = None, batch_size: int = 8,
                  device: str | torch.device | None = None, progress: bool = True,
                  scores: dict | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Hit counts {layer: (K, 2**tau) int64} over about `n_tokens` tokens of the 1-D token array `tokens`
    (non-overlapping windows of `seq_len`, spread evenly over the text); returns (counts, tokens seen).
    A `scores` dict is filled with each layer's weight histogram (see `score_stats`)."""
    from tqdm.auto import tqdm

    from memoryformer.data import eval_starts

    layers = memory_layers(model)
    if not layers:
        raise MemoryFormerError("analyze: this model has no Memory Layers (a dense control has no buckets)")
    seq_len = seq_len or model.config.max_seq_len
    device = device or next(model.parameters()).device
    counts = {name: torch.zeros(m.n_tables, 2**m.tau, dtype=torch.int64) for name, m in layers.items()}
    if scores is not None:
        scores.update({name: dict(hist=np.zeros(len(SCORE_EDGES) + 1, dtype=np.int64), n=0, sum=0.0, sumsq=0.0,
                                  min=math.inf, max=-math.inf) for name in layers})

    def hook(name, layer):
        def pre(_mod, args):
            codes, weights = layer.hash(args[0])  # (..., K)
            if scores is not None:
                w = weights.detach().double().flatten().cpu().numpy()
                h = scores[name]
                h["hist"] += np.bincount(np.searchsorted(SCORE_EDGES, w), minlength=len(SCORE_EDGES) + 1)
                h["n"] += w.size
                h["sum"] += float(w.sum())
                h["sumsq"] += float((w * w).sum())
                h["min"], h["max"] = min(h["min"], float(w.min())), max(h["max"], float(w.max()))
            codes = codes.reshape(-1, layer.n_tables).cpu()
            flat = codes + torch.arange(layer.n_tables)[None, :] * 2**layer.tau
            counts[name] += torch.bincount(flat.flatten(), minlength=layer.n_tables * 2**layer.tau).view_as(counts[name])
        return pre

    handles = [m.register_forward_pre_hook(hook(name, m)) for name, m in layers.items()]
    starts = eval_starts(len(tokens), seq_len, n_tokens)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for j in tqdm(range(0, len(starts), batch_size), desc="buckets", unit="batch", disable=not progress, leave=False):
            idx = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64)
                                             for s in starts[j : j + batch_size]]))
            model(idx.to(device))
            seen += idx.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v.numpy() for k, v in counts.items()}, seen


def summarize(counts: dict[str, np.ndarray], tokens: int, scores: dict | None = None) -> dict:
    layers = {name: table_stats(c) for name, c in counts.items()}
    if scores:
        for name, h in scores.items():
            layers[name]["scores"] = score_stats(h)
    by_kind: dict[str, dict] = {}
    for kind in ("qkv", "l1", "l2"):
        rows = [v for k, v in layers.items() if k.endswith("." + kind)]
        if rows:
            by_kind[kind] = {m: round(float(np.mean([r[m] for r in rows])), 5)
                             for m in ("mean_unused", "mean_entropy", "mean_max_over_mean")}
    return {"tokens": tokens, "note": "qkv: one shared hash for Q, K and V", "by_kind": by_kind, "layers": layers}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savez(path: Path, counts: dict) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary's name
        np.savez_compressed(f, **counts)


def _save(fig, path: str | os.PathLike) -> None:
    save_figure(fig, path)
    _pyplot().close(fig)


def plot_scores(scores: dict, path: str | os.PathLike, title: str = "") -> None:
    """One panel per layer kind (qkv, l1, l2): the weight histogram of every block, log-scaled weights."""
    _save(scores_figure(scores, title), path)


def scores_figure(scores: dict, title: str = ""):
    plt = _pyplot()

    kinds = [k for k in ("qkv", "l1", "l2") if any(n.endswith("." + k) for n in scores)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 2.8), dpi=110, squeeze=False)
    mids = np.sqrt(SCORE_EDGES[1:] * SCORE_EDGES[:-1])
    for j, (ax, kind) in enumerate(zip(axes[0], kinds)):
        lo, hi = len(mids), 0  # the occupied bins of this panel: the x-axis spans them, not all ten decades
        for name, h in scores.items():
            if name.endswith("." + kind):
                frac = h["hist"][1:-1] / max(h["n"], 1)
                ax.plot(mids, frac, lw=0.9, label=name.split(".")[0])
                hit = np.flatnonzero(frac)
                if hit.size:
                    lo, hi = min(lo, hit[0]), max(hi, hit[-1])
        if lo <= hi:
            ax.set_xlim(SCORE_EDGES[max(lo - 2, 0)], SCORE_EDGES[min(hi + 3, len(SCORE_EDGES) - 1)])
        ax.set_xscale("log")
        ax.set_title(f"{kind}: weight of each chunk", fontsize=8)
        ax.set_xlabel("weight (log scale)", fontsize=7)
        if j == 0:
            ax.set_ylabel("fraction of chunks per bin", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_buckets(counts: dict[str, np.ndarray], path: str | os.PathLike, title: str = "") -> None:
    """Figure-4-style grid: one row per block; columns = first and last table of qkv, l1, l2 (hits per row; the
    dashed line is the uniform share)."""
    _save(buckets_figure(counts, title), path)


def buckets_figure(counts: dict[str, np.ndarray], title: str = ""):
    plt = _pyplot()

    blocks = sorted({int(k.split(".")[0][5:]) for k in counts})
    kinds = [k for k in ("qkv", "l1", "l2") if f"block{blocks[0]}.{k}" in counts]
    cols = [(k, t) for k in kinds for t in (0, -1)]
    fig, axes = plt.subplots(len(blocks), len(cols), figsize=(2.6 * len(cols), 1.9 * len(blocks)), dpi=110,
                             squeeze=False)
    for r, b in enumerate(blocks):
        for c, (kind, t) in enumerate(cols):
            hits = counts[f"block{b}.{kind}"][t]
            ax = axes[r][c]
            ax.bar(np.arange(len(hits)), hits, width=1.0, color="tab:blue" if kind == "qkv" else "tab:orange"
                   if kind == "l1" else "tab:green")
            ax.axhline(hits.sum() / len(hits), color="k", lw=0.6, ls="--")  # uniform
            K = counts[f"block{b}.{kind}"].shape[0]
            ax.set_title(f"block {b} {kind} table {t % K + 1}/{K}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlim(0, len(hits))
            if r == len(blocks) - 1:
                ax.set_xlabel("table row (bucket code)", fontsize=7)
            if c == 0:
                ax.set_ylabel("tokens hashed to it", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def analyze_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, data: str | None = None,
                       n_tokens: int = 262_144, batch_size: int = 8, device: str = "cpu", progress: bool = True,
                       verify: bool = True) -> dict:
    """Load a checkpoint, count bucket hits over validation text (`data` as `memoryformer train --data`; default: the
    bundled sample's validation books) and write OUT/buckets.json, OUT/buckets.png and OUT/bucket_counts.npz."""
    from memoryformer import data as data_mod
    from memoryformer.checkpoint import load_model

    model = load_model(checkpoint, device=device, verify=verify)
    if not memory_layers(model):
        raise MemoryFormerError(f"{checkpoint}: a {model.config.arch} model has no Memory Layers to analyse")
    if n_tokens < 1:
        raise MemoryFormerError(f"tokens: expected a positive number, got {n_tokens}")
    tokens = data_mod.val_tokens(data)
    scores: dict = {}
    counts, seen = bucket_counts(model, tokens, n_tokens=n_tokens, batch_size=batch_size, device=device,
                                 progress=progress, scores=scores)
    summary = summarize(counts, seen, scores)
    summary["checkpoint"] = str(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "buckets.json", json.dumps(summary, indent=1) + "\n")
    replace_file(out / "bucket_counts.npz", lambda p: _savez(p, counts))
    ck = Path(checkpoint).resolve()
    name = ck.parent.name if ck.name == "final" else ck.name  # runs/<name>/final
    plot_buckets(counts, out / "buckets.png", title=f"{name}: bucket hits over {seen:,} tokens")
    plot_scores(scores, out / "scores.png", title=f"{name}: Memory Layer weights over {seen:,} tokens")
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"bucket usage over {summary['tokens']:,} tokens (qkv: one shared hash for Q, K and V)",
             f"{'layer':<12}{'rows':>6}{'unused':>9}{'entropy':>9}{'max/mean':>10}{'weight p01':>12}{'p50':>9}{'p99':>9}"]
    for name, s in summary["layers"].items():
        sc = s.get("scores")
        w = f"{sc['p01']:>12.3g}{sc['p50']:>9.3g}{sc['p99']:>9.3g}" if sc else ""
        lines.append(f"{name:<12}{s['rows']:>6}{s['mean_unused']:>9.3f}{s['mean_entropy']:>9.3f}"
                     f"{s['mean_max_over_mean']:>10.2f}{w}")
    return "\n".join(lines)


def output_folders(checkpoints: list[str], out: str | os.PathLike) -> list[tuple[str, Path]]:
    """Where each checkpoint's analysis goes: OUT itself for one, OUT/<run name> for several (runs/<name>/final)."""
    if len(checkpoints) == 1:
        return [(checkpoints[0], Path(out))]
    pairs = []
    for ck in checkpoints:
        p = Path(ck).resolve()
        pairs.append((ck, Path(out) / (p.parent.name if p.name == "final" else p.name)))
    return pairs
