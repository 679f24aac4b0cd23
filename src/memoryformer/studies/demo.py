"""`memoryformer demo`: train micro MemoryFormer and its dense control on the bundled text, then compare them.

Both models see the same tokens in the same order (same seed, same batches) under the training recipe of
`memoryformer.train`, advancing in turns to five token milestones (`studies.rounds`). The token budget is fixed up
front from `--minutes` and the throughput these models reach on two idle CPU cores (`IDLE_TOKENS_PER_S`), never
from a timing taken now: a busy machine makes the demo slower, not different. Its verdict depends only on the budget
and the seed. Writes OUT/report.md (a table and loss curves, OUT/loss.png), OUT/report.json and the two runs
OUT/mf, OUT/dense (each with final/).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from memoryformer import data as data_mod
from memoryformer.config import DENSE_CONTROL, SAMPLE, ConfigError, TrainConfig, get_config
from memoryformer.flops import forward_flops_per_token
from memoryformer.generate import generate
from memoryformer.integrity import save_figure, write_text
from memoryformer.studies.rounds import Contender, milestones, run_rounds
from memoryformer.train import default_lr

PROMPT = "It was a dark and stormy night; the rain fell"
# Training tokens/s of each preset on two idle cores (fp32, batch 8 x 256, AdamW; Intel Xeon and AMD EPYC VMs
# measured within 10 % of each other), used to size the budget. Validation adds about a sixth on top.
IDLE_TOKENS_PER_S = {"micro": 2100.0, "micro-dense": 2300.0}
# Below this many tokens per model, the MemoryFormer / dense ratio of micro models moves by more than its spread
# over seeds (benchmarks/results/quality_micro_cpu_5M.md: 1.004 at 0.5 M, 1.067 at 1.5 M, 1.005 at 5 M tokens).
CONCLUSIVE_TOKENS = 5_000_000


def budget_tokens(minutes: float, names: list[str], batch_size: int, seq_len: int) -> int:
    """Training tokens per model that fit `minutes` on two idle cores (whole batches, at least one)."""
    per_token = sum(1.0 / IDLE_TOKENS_PER_S.get(n, 2000.0) for n in names) * (1 + 1 / 6)
    seconds = max(10.0, 0.9 * minutes * 60 - 15 * len(names))  # ~15 s per model to start, save and sample
    step = batch_size * seq_len
    return max(1, int(seconds / per_token) // step) * step


@torch.no_grad()
def sample_text(model, prompt: str, n_tokens: int = 40, temperature: float = 0.8, seed: int = 0) -> str:
    device = next(model.parameters()).device
    ids = torch.tensor([data_mod.encode(prompt)], device=device)  # (1, T)
    out = generate(model.eval(), ids, n_tokens, temperature=temperature, generator=torch.Generator().manual_seed(seed))
    return data_mod.decode(out[0, ids.shape[1] :].tolist())


def eval_source(data: str | None) -> str | None:
    """The `memoryformer eval --data` value whose text is the demo's validation split, or None where there is none
    (validation held out as the tail of the training files)."""
    if data in (None, SAMPLE):
        return SAMPLE
    plan = data_mod.plan_splits(data)["val"]
    if plan.part != "all":
        return None
    if plan.hf_split is not None:
        return data  # hf:NAME: eval scores its validation split too
    return plan.sources[0] if len(plan.sources) == 1 else None


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def plot_curves(runs: dict[str, Path], dest: Path) -> None:
    """Training and validation loss against tokens for each run, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for (label, run), color in zip(runs.items(), ("tab:red", "tab:blue")):
        m = _read_metrics(run)
        ax.plot([r["tokens"] / 1e3 for r in m], [r["loss"] for r in m], color=color, alpha=0.55, label=f"{label} train")
        val = {r["tokens"]: r["val_loss"] for r in m if "val_loss" in r}  # one point per step, even where resumed
        ax.plot([t / 1e3 for t in val], list(val.values()), "o-", color=color, label=f"{label} val")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("MemoryFormer vs dense control, same tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, dest)
    plt.close(fig)


def run_demo(minutes: float = 10.0, out: str = "runs/demo", *, preset: str = "micro", data: str | None = None,
             tokens: int | None = None, batch_size: int = 8, eval_tokens: int = 32768, device: str = "auto",
             seed: int = 0, progress: bool = True, overrides: dict | None = None) -> dict:
    """Train `preset` and its dense control for the same tokens; write OUT/report.{md,json} and OUT/loss.png.

    `tokens` (per model) overrides the budget sized from `minutes`; `overrides`: model fields for both models.
    """
    if preset not in DENSE_CONTROL:
        raise ConfigError(f"preset: expected a MemoryFormer preset with a dense control ({', '.join(DENSE_CONTROL)}), "
                          f"got {preset!r}")
    t_start, out = time.perf_counter(), Path(out)
    names = {"MemoryFormer": preset, "dense control": DENSE_CONTROL[preset]}
    cfgs = {k: get_config(n, **(overrides or {})) for k, n in names.items()}
    seq_len = cfgs["MemoryFormer"].max_seq_len
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    tokens = tokens or budget_tokens(minutes, list(names.values()), batch_size, seq_len)
    steps = max(1, math.ceil(tokens / (batch_size * seq_len)))
    tokens = steps * batch_size * seq_len
    print(f"memoryformer demo: {preset} MemoryFormer vs its dense control {names['dense control']}, {tokens:,} "
          f"training tokens each ({steps} steps of {batch_size} x {seq_len}), same batches, on {dev}", flush=True)
    data_mod.load_tokens(data, "train", progress=progress)
    val = data_mod.load_tokens(data, "val", progress=progress)
    eval_tokens = min(eval_tokens, (len(val) - 1) // seq_len * seq_len)
    runs = {"MemoryFormer": out / "mf", "dense control": out / "dense"}
    for run in runs.values():
        if run.exists():  # a previous demo: start this one afresh
            shutil.rmtree(run)
    base = TrainConfig(data=data, batch_size=batch_size, seq_len=seq_len, max_steps=steps, eval_every=0,
                       eval_tokens=eval_tokens, log_every=max(1, min(10, steps // 50)), ckpt_every=0,
                       keep_checkpoints=1, seed=seed, device=device, progress=progress)
    contenders = [Contender(k, cfgs[k], runs[k]) for k in names]
    got = run_rounds(contenders, base, milestones(steps, 5), log=lambda m: print("\n" + m, flush=True))
    final = got[steps]
    rows = [_row(k, names[k], cfgs[k], final[k], runs[k], seq_len, dev, seed) for k in names]
    plot_curves({names[k]: r for k, r in runs.items()}, out / "loss.png")
    report = dict(preset=preset, dense=names["dense control"], device=str(dev), seq_len=seq_len, batch_size=batch_size,
                  steps=steps, tokens=tokens, eval_tokens=len(data_mod.eval_starts(len(val), seq_len, eval_tokens))
                  * seq_len, val_tokens_total=len(val), rows=rows, ppl_ratio=rows[0]["val_ppl"] / rows[1]["val_ppl"],
                  conclusive=tokens >= CONCLUSIVE_TOKENS, minutes=round((time.perf_counter() - t_start) / 60, 2),
                  data=data or "sample")
    write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text(out / "report.md", "\n".join(_markdown(report, rows)))
    print("\n" + "\n".join(_table(rows)))
    print(f"\nMemoryFormer / dense validation perplexity: {report['ppl_ratio']:.3f}"
          + ("" if report["conclusive"] else f" (inconclusive below {CONCLUSIVE_TOKENS:,} tokens per model)"))
    print(f"Report: {out / 'report.md'} (loss curves: {out / 'loss.png'})")
    return report


def _row(key: str, preset: str, cfg, s: dict, run: Path, seq_len: int, dev, seed: int) -> dict:
    from memoryformer.checkpoint import load_model

    m = _read_metrics(run)
    model = load_model(run / "final", device=dev)
    return dict(model=key, preset=preset, lr=default_lr(cfg), dense_params=s["params"]["dense"],
                table_params=s["params"]["table"], table_mb=s["params"]["table_bytes"] / 1e6,
                flops_per_token=forward_flops_per_token(cfg, seq_len), tokens=s["tokens"],
                tokens_per_s=s["tokens_per_s"], first_loss=m[0]["loss"], final_loss=s["train_loss"],
                val_loss=s["val_loss"], val_ppl=math.exp(s["val_loss"]), checkpoint=str(run / "final"),
                sample=sample_text(model, PROMPT, seed=seed))


def _markdown(rep: dict, rows: list[dict]) -> list[str]:
    verdict = f"MemoryFormer / dense validation perplexity: {rep['ppl_ratio']:.3f}."
    if not rep["conclusive"]:
        verdict += (f" **At {rep['tokens']:,} tokens per model this comparison is inconclusive: below "
                    f"{CONCLUSIVE_TOKENS:,} tokens the ratio of micro models still moves by several per cent as "
                    "training goes on (1.004, 1.067, 1.005 at 0.5 M, 1.5 M and 5 M tokens in "
                    "benchmarks/results/quality_micro_cpu_5M.md).**")
    src = "the bundled Gutenberg sample" if rep["data"] == "sample" else rep["data"]
    val_src = eval_source(None if rep["data"] == "sample" else rep["data"])
    if val_src is None:
        same = "(held out as the tail of the training files, so no `memoryformer eval --data` line scores them)"
    else:
        same = (f"`memoryformer eval --checkpoint {rows[0]['checkpoint']} --data {val_src} --max-tokens "
                f"{rep['eval_tokens']} --seq-len {rep['seq_len']}` scores the same windows")
    return [
        f"# memoryformer demo: {rep['preset']} MemoryFormer vs {rep['dense']}", "",
        f"Both trained on {src} for the same {rep['tokens']:,} tokens ({rep['steps']} steps of {rep['batch_size']} x "
        f"{rep['seq_len']}), same batches, AdamW with cosine LR and 1 % warmup at the recipe's peak LRs (MemoryFormer "
        f"{rows[0]['lr']:g}, dense {rows[1]['lr']:g}), on {rep['device']}. Wall time {rep['minutes']} min.", "",
        f"Validation: {rep['eval_tokens']:,} tokens of held-out books ({rep['eval_tokens'] // rep['seq_len']} windows "
        f"of {rep['seq_len'] + 1} tokens spread evenly over the {rep['val_tokens_total']:,} validation tokens), the "
        f"same windows for both models; {same}.", "",
        *_table(rows), "", verdict,
        "FLOPs per token: multiply-accumulates of one forward pass at this sequence length, LM head included "
        "(the head dominates at this width).", "", "![loss curves](loss.png)", "",
        f"Samples (prompt: \"{PROMPT}\", temperature 0.8):", "",
        *[f"- **{r['preset']}**: {' '.join(r['sample'].split())}" for r in rows], "",
    ]


def _table(rows: list[dict]) -> list[str]:
    lines = ["| model | dense params | table params | tables | FLOPs/token | tokens/s | train loss (first -> last) "
             "| val loss | val PPL |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['preset']}) | {r['dense_params'] / 1e6:.2f} M | {r['table_params'] / 1e6:.2f} M | "
            f"{r['table_mb']:.0f} MB | {r['flops_per_token'] / 1e6:.2f} M | {r['tokens_per_s']:,.0f} | "
            f"{r['first_loss']:.2f} -> {r['final_loss']:.2f} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} |")
    return lines
