"""`memoryformer demo`: train micro MemoryFormer and its dense control on the bundled text, then compare them.

Both models see the same tokens in the same order (same seed, same batches) under the training recipe of
`memoryformer.train`. The token budget is fitted to `--minutes` by timing a few training steps of each model first.
Writes OUT/report.md (a table and loss curves, OUT/loss.png), OUT/report.json and the two runs OUT/mf, OUT/dense.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memoryformer import data as data_mod
from memoryformer.config import DENSE_CONTROL, ConfigError, get_config
from memoryformer.flops import forward_flops_per_token
from memoryformer.generate import generate
from memoryformer.model import build_model
from memoryformer.train import TrainConfig, default_lr, resume_config, train

PROMPT = "It was a dark and stormy night; the rain fell"


def _seconds_per_token(cfg, tokens, batch_size: int, seq_len: int, device: torch.device) -> float:
    """Wall seconds per training token of `cfg` (forward, backward and AdamW step), timed on this machine."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4)
    micro = max(1, min(batch_size, 2048 // seq_len))
    x = data_mod.windows(tokens, torch.arange(batch_size).numpy() * (seq_len + 1), seq_len + 1).to(device)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for i in range(0, batch_size, micro):
            _, loss = model(x[i : i + micro, :-1], x[i : i + micro, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[-1] / (batch_size * seq_len)


@torch.no_grad()
def sample_text(model, prompt: str, n_tokens: int = 40, temperature: float = 0.8, seed: int = 0) -> str:
    """A continuation of `prompt` sampled token by token (no KV cache: fine for a few dozen tokens)."""
    device = next(model.parameters()).device
    ids = torch.tensor([data_mod.encode(prompt)], device=device)  # (1, T)
    start = ids.shape[1]
    model.eval()
    ids = generate(model, ids, n_tokens, temperature=temperature, generator=torch.Generator().manual_seed(seed))
    return data_mod.decode(ids[0, start:].tolist())


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
        ev = [r for r in m if "val_loss" in r]
        ax.plot([r["tokens"] / 1e3 for r in ev], [r["val_loss"] for r in ev], "o-", color=color, label=f"{label} val")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("MemoryFormer vs dense control, same tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)


def run_demo(
    minutes: float = 10.0,
    out: str = "runs/demo",
    *,
    preset: str = "micro",
    data: str | None = None,
    tokens: int | None = None,
    batch_size: int = 8,
    eval_tokens: int = 32768,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Train `preset` and its dense control for the same tokens; write OUT/report.{md,json} and OUT/loss.png.

    `overrides`: model fields applied to both models (e.g. a smaller width for a quick check).
    """
    if preset not in DENSE_CONTROL:
        raise ConfigError(f"preset: expected a MemoryFormer preset with a dense control ({', '.join(DENSE_CONTROL)}), got {preset!r}")
    t_start = time.perf_counter()
    out = Path(out)
    overrides = overrides or {}
    cfgs = {"MemoryFormer": get_config(preset, **overrides), "dense control": get_config(DENSE_CONTROL[preset], **overrides)}
    names = {"MemoryFormer": preset, "dense control": DENSE_CONTROL[preset]}
    seq_len = cfgs["MemoryFormer"].max_seq_len
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    print(f"memoryformer demo: {preset} MemoryFormer vs its dense control {DENSE_CONTROL[preset]}, "
          f"same tokens, on {dev}", flush=True)
    train_tok = data_mod.load_tokens(data, "train", progress=progress)
    data_mod.load_tokens(data, "val", progress=progress)

    fitted = tokens is None
    if fitted:
        spt = {k: _seconds_per_token(c, train_tok, batch_size, seq_len, dev) for k, c in cfgs.items()}
        used = time.perf_counter() - t_start
        # 5 evaluations per model of at most 10 % of its training tokens each, forward only (~1/3 the cost of a
        # training token): at most 1/6 on top of training. Plus ~10 s per model to start, save and sample.
        budget = max(10.0, 0.92 * minutes * 60 - used - 10 * len(cfgs))
        tokens = int(budget / (sum(spt.values()) * (1 + 1 / 6)))
        eval_tokens = max(seq_len, min(eval_tokens, tokens // 10 // seq_len * seq_len))
        print("  measured " + ", ".join(f"{k} {1 / s:,.0f} tokens/s" for k, s in spt.items())
              + f" -> {tokens:,} training tokens per model to fit {minutes:g} minutes", flush=True)
    steps = max(1, tokens // (batch_size * seq_len))
    summaries = {}
    runs = {"MemoryFormer": out / "mf", "dense control": out / "dense"}
    for run in runs.values():
        if run.exists():  # a previous demo: start this one afresh
            import shutil

            shutil.rmtree(run)
    # The models advance in turns, a fifth of the schedule at a time, so that if the machine gets slower than it
    # measured at the start, both can stop at the same token count instead of overrunning --minutes.
    milestones = sorted({max(1, round(steps * (i + 1) / 5)) for i in range(5)})
    t_train = time.perf_counter()
    done_steps = 0
    for i, ms in enumerate(milestones):
        for key, cfg in cfgs.items():
            print(f"\n[{key}: {names[key]}, to step {ms} of {steps}]", flush=True)
            if i == 0:
                tcfg = TrainConfig(
                    data=data, out=str(runs[key]), batch_size=batch_size, seq_len=seq_len, max_steps=steps,
                    eval_every=max(1, steps // 5), eval_tokens=eval_tokens, log_every=max(1, min(10, steps // 50)),
                    ckpt_every=0, keep_checkpoints=1, seed=seed, device=device, progress=progress, stop_after=ms,
                )
                summaries[key] = train(cfg, tcfg)
            else:
                _, tcfg, _ = resume_config(runs[key], stop_after=ms, progress=progress)
                summaries[key] = train(None, tcfg, resume=runs[key])
            if summaries[key]["stopped_by"] == "interrupt":
                return {"interrupted": True, "out": str(out)}
        done_steps = ms
        if fitted and i + 1 < len(milestones):
            per_step = (time.perf_counter() - t_train) / ms
            if time.perf_counter() + per_step * (milestones[i + 1] - ms) > t_start + 1.1 * minutes * 60:
                print(f"\n  this machine is slower now than when measured: stopping both models at step {ms} "
                      f"of {steps} to keep to {minutes:g} minutes", flush=True)
                break

    from memoryformer.checkpoint import load_model

    rows = []
    for key, cfg in cfgs.items():
        s = summaries[key]
        m = _read_metrics(runs[key])
        model = load_model(runs[key], device=dev)  # final/, or the checkpoint where it stopped
        rows.append(dict(
            model=key, preset=names[key], lr=default_lr(cfg),
            dense_params=s["params"]["dense"], table_params=s["params"]["table"],
            table_mb=s["params"]["table_bytes"] / 1e6,
            flops_per_token=forward_flops_per_token(cfg, seq_len),
            tokens=s["tokens"], tokens_per_s=s["tokens_per_s"],
            first_loss=m[0]["loss"], final_loss=s["train_loss"], val_loss=s["val_loss"], val_ppl=s["val_ppl"],
            sample=sample_text(model, PROMPT, seed=seed),
        ))
    plot_curves({names[k]: r for k, r in runs.items()}, out / "loss.png")
    ratio = rows[0]["val_ppl"] / rows[1]["val_ppl"]
    report = dict(preset=preset, dense=DENSE_CONTROL[preset], device=str(dev), seq_len=seq_len,
                  batch_size=batch_size, steps=done_steps, planned_steps=steps,
                  tokens=done_steps * batch_size * seq_len, rows=rows,
                  ppl_ratio=ratio, minutes=round((time.perf_counter() - t_start) / 60, 2))
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    table = _table(rows)
    md = [
        f"# memoryformer demo: {preset} MemoryFormer vs {DENSE_CONTROL[preset]}",
        "",
        f"Both trained on {'the bundled Gutenberg sample' if data in (None, 'sample') else data} for the same "
        f"{report['tokens']:,} tokens ({done_steps} step{'s' if done_steps != 1 else ''} of {batch_size} x {seq_len}"
        f"{f', stopped early: {steps} planned' if done_steps < steps else ''}), same "
        f"batches, AdamW with cosine LR and 1 % warmup at the recipe's peak LRs (MemoryFormer {rows[0]['lr']:g}, "
        f"dense {rows[1]['lr']:g}), on {dev}; validation on {eval_tokens:,} tokens of held-out books. "
        f"Wall time {report['minutes']} min.",
        "",
        *table,
        "",
        f"MemoryFormer / dense validation perplexity: {ratio:.3f}.",
        "FLOPs per token: multiply-accumulates of one forward pass at this sequence length, LM head included "
        "(the head dominates at this width).",
        "",
        "![loss curves](loss.png)",
        "",
        f"Samples (prompt: \"{PROMPT}\", temperature 0.8):",
        "",
        *[f"- **{r['preset']}**: {' '.join(r['sample'].split())}" for r in rows],
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    print("\n" + "\n".join(table))
    print(f"\nMemoryFormer / dense validation perplexity: {ratio:.3f}")
    print(f"Report: {out / 'report.md'} (loss curves: {out / 'loss.png'})")
    return report


def _table(rows: list[dict]) -> list[str]:
    head = ("| model | dense params | table params | tables | FLOPs/token | tokens/s | train loss (first -> last) "
            "| val loss | val PPL |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['preset']}) | {r['dense_params'] / 1e6:.2f} M | {r['table_params'] / 1e6:.2f} M | "
            f"{r['table_mb']:.0f} MB | {r['flops_per_token'] / 1e6:.2f} M | {r['tokens_per_s']:,.0f} | "
            f"{r['first_loss']:.2f} -> {r['final_loss']:.2f} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} |"
        )
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="time for the whole demo (default 10)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--preset", default="micro", choices=sorted(DENSE_CONTROL), help="MemoryFormer preset (default micro)")
    p.add_argument("--data", default=None, help="training text (default: the bundled sample)")
    p.add_argument("--tokens", type=lambda s: int(float(s)), default=None,
                   help="training tokens per model (default: fitted to --minutes)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens per evaluation (default 32768)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")


def main(args: argparse.Namespace) -> dict:
    if not args.minutes > 0:
        raise ConfigError(f"minutes: expected a positive number (got {args.minutes})")
    if args.tokens is not None and args.tokens < 1:
        raise ConfigError(f"tokens: expected a positive number (got {args.tokens})")
    rep = run_demo(args.minutes, args.out, preset=args.preset, data=args.data, tokens=args.tokens,
                   batch_size=args.batch_size, eval_tokens=args.eval_tokens, device=args.device, seed=args.seed,
                   progress=args.progress)
    if rep.get("interrupted"):
        raise SystemExit(130)
    return rep
