"""Quality at equal tokens: a MemoryFormer preset vs its dense control, same data in the same order.

    python benchmarks/quality.py --config micro --tokens 5e6 \\
        --data ../shared/data/corpus/gutenberg_en/gutenberg_en.train.00.jsonl.xz \\
        --val-data ../shared/data/corpus/gutenberg_en/gutenberg_en.val.jsonl.xz

Both models follow the training recipe (memoryformer.train) with their default LRs (MemoryFormer 3x the dense
control's) and the same seed, so they see identical batches. Training runs in rounds: each model in turn advances
to the next token milestone (`--rounds` of them), and after every round both are evaluated on the same fixed
validation windows and the results files are rewritten. So an interrupted benchmark still reports an equal-token
comparison (mid-schedule, marked as such), and re-running the same command continues where it stopped.

Variants of the MemoryFormer side: `--mf-set weighting=paper` (repeatable) trains the preset with those fields
changed, in its own run folder, against the same dense control: a dense run already in OUT is reused (its
validation loss at each milestone is read from its metrics.jsonl), so only the MemoryFormer variant trains.
`--max-rounds N` stops after the first N milestones of the schedule (the comparison is then mid-schedule).

Writes benchmarks/results/quality_<config>_<device>[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from memoryformer import checkpoint as ckpt_io
from memoryformer import data as data_mod
from memoryformer.config import DENSE_CONTROL, get_config
from memoryformer.flops import forward_flops_per_token
from memoryformer.train import TrainConfig, default_lr, resume_config, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="micro", choices=sorted(DENSE_CONTROL), help="MemoryFormer preset")
    ap.add_argument("--tokens", type=float, default=5e6, help="training tokens per model (default 5e6)")
    ap.add_argument("--data", default=None, help="training data (default: the bundled sample)")
    ap.add_argument("--val-data", default=None, help="validation data (default: the data's val split)")
    ap.add_argument("--out", default="runs/quality", help="run folders (default runs/quality)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    ap.add_argument("--rounds", type=int, default=5, help="token milestones at which both models are compared")
    ap.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens per comparison")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS), help="folder for quality_*.{json,md}")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    ap.add_argument("--tag", default="", help="suffix of the results' file names: quality_<config>_<device>_<tag>")
    ap.add_argument("--mf-set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a field of the MemoryFormer preset (repeatable), e.g. weighting=paper")
    ap.add_argument("--max-rounds", type=int, default=None, help="stop after this many milestones")
    ap.add_argument("--dense-from", metavar="JSON", default=None,
                    help="take the dense control's validation numbers from an earlier results file of the same "
                         "schedule instead of training it again")
    args = ap.parse_args(argv)

    overrides = {}
    for item in args.mf_set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--mf-set: expected KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    mf_cfg = get_config(args.config, **overrides)
    dense_name = DENSE_CONTROL[args.config]
    dense_cfg = get_config(dense_name)
    seq_len = args.seq_len or mf_cfg.max_seq_len
    tokens_per_step = args.batch_size * seq_len
    total_steps = max(1, math.ceil(args.tokens / tokens_per_step))
    milestones = sorted({max(1, round(total_steps * (i + 1) / args.rounds)) for i in range(args.rounds)})
    out = Path(args.out)
    dev_tag = "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = res_dir / f"quality_{args.config}_{dev_tag}{'_' + args.tag if args.tag else ''}"
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    base = TrainConfig(
        data=args.data, val_data=args.val_data, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        seq_len=seq_len, max_steps=total_steps, eval_every=0, eval_tokens=args.eval_tokens, log_every=10,
        ckpt_every=0, keep_checkpoints=1, seed=args.seed, device=args.device, progress=sys.stderr.isatty(),
    )
    mf_label = args.config + "".join(f" {k}={v}" for k, v in overrides.items())
    models = {"memoryformer": (mf_label, mf_cfg), "dense": (dense_name, dense_cfg)}
    mf_dir = f"{args.config}-memoryformer" + "".join(f"-{k}={v}" for k, v in overrides.items())
    rows: list[dict] = []
    prev = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else None
    if prev and prev.get("command") == command:
        rows = prev.get("milestones", [])
    info = {k: {"preset": n, "lr": default_lr(c), "params": None, "tokens_per_s": None} for k, (n, c) in models.items()}
    t_start = time.time()
    dense_rows = None
    if args.dense_from:
        prior = json.loads(Path(args.dense_from).read_text())
        for key, want in (("total_steps", total_steps), ("batch_size", args.batch_size), ("seq_len", seq_len),
                          ("eval_tokens", args.eval_tokens)):
            if prior.get(key) != want:
                ap.error(f"--dense-from: {args.dense_from} has {key}={prior.get(key)!r}, this run {want!r}")
        dense_rows = {r["step"]: r["dense"] for r in prior["milestones"]}
        info["dense"].update(prior["models"]["dense"])
    for ms in milestones[: args.max_rounds]:
        if any(r["step"] == ms for r in rows):
            continue
        row = {"step": ms, "tokens": ms * tokens_per_step, "schedule_done": ms == total_steps}
        for key, (name, cfg) in models.items():
            if key == "dense" and dense_rows is not None:
                if ms not in dense_rows:
                    ap.error(f"--dense-from: {args.dense_from} has no dense result at step {ms}")
                row[key] = dense_rows[ms]
                continue
            run = out / (mf_dir if key == "memoryformer" else f"{args.config}-{key}")
            found = ckpt_io.find_checkpoint(run, required=False)
            if found is not None:
                _, tcfg, _ = resume_config(run, cfg)
                done = json.loads((found / ckpt_io.TRAINER).read_text())["step"]
                if done < ms:
                    s = train(None, tcfg.replace(stop_after=ms, progress=base.progress), resume=run)
                else:
                    s = _summary_at(run, ms)
            else:
                s = train(cfg, base.replace(out=str(run), stop_after=ms))
            if s["stopped_by"] == "interrupt":  # Ctrl-C / SIGTERM: the checkpoint is saved; rerun to continue
                raise SystemExit(130)
            info[key]["params"] = s["params"]
            info[key]["tokens_per_s"] = s["tokens_per_s"]
            vl = s["val_loss"]  # the trainer's evaluation at the milestone: the same fixed windows for both models
            row[key] = {"val_loss": round(vl, 5), "val_ppl": round(math.exp(vl), 3), "train_loss": s["train_loss"]}
        row["ppl_ratio"] = round(row["memoryformer"]["val_ppl"] / row["dense"]["val_ppl"], 4)
        rows.append(row)
        write(stem, args, command, mf_cfg, dense_cfg, seq_len, total_steps, rows, info, t_start)
        print(f"[{ms}/{total_steps} steps] MF val ppl {row['memoryformer']['val_ppl']:.2f}, "
              f"dense {row['dense']['val_ppl']:.2f}, ratio {row['ppl_ratio']:.3f}", flush=True)
    return write(stem, args, command, mf_cfg, dense_cfg, seq_len, total_steps, rows, info, t_start)


def _summary_at(run: Path, step: int) -> dict:
    """A finished (or further trained) run's numbers at an earlier milestone: the validation loss the trainer logged
    when it stopped there (metrics.jsonl), with the run's parameter counts and throughput (summary.json)."""
    summary = json.loads((run / "summary.json").read_text())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step") == step and "val_loss" in rec:
            return {**summary, "val_loss": rec["val_loss"], "train_loss": rec.get("loss"), "stopped_by": "done"}
    raise SystemExit(f"{run}: no validation loss logged at step {step} (trained with a different schedule?)")


def write(stem, args, command, mf_cfg, dense_cfg, seq_len, total_steps, rows, info, t_start) -> dict:
    last = rows[-1] if rows else None
    result = {
        "benchmark": "quality at equal tokens",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")),
        "torch": torch.__version__,
        "command": command,
        "config": args.config,
        "data": data_mod.describe(args.data, args.val_data),
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "tokens_per_step": args.batch_size * seq_len,
        "total_steps": total_steps,
        "planned_tokens": total_steps * args.batch_size * seq_len,
        "eval_tokens": args.eval_tokens,
        "wall_s_this_invocation": round(time.time() - t_start, 1),
        "models": {
            k: {**v, "flops_per_token": forward_flops_per_token(c, seq_len)}
            for (k, v), c in zip(info.items(), (mf_cfg, dense_cfg))
        },
        "milestones": rows,
        "complete": bool(last and last["schedule_done"]),
        "final": last,
        "goal": "MemoryFormer val PPL <= 0.95 x the dense control's",
        "goal_met": bool(last and last["ppl_ratio"] <= 0.95),
        "notes": args.note,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Quality: MF-{args.config} vs {info['dense']['preset']} at equal tokens",
        "",
        f"- date: {result['date']}; device: {result['device']}; torch {result['torch']}",
        f"- command: `{command}`",
        f"- data: train {', '.join(result['data']['train']['sources'])}; val {', '.join(result['data']['val']['sources'])}"
        f" ({args.eval_tokens:,} fixed validation tokens per comparison)",
        f"- schedule: {total_steps} steps x {args.batch_size} x {seq_len} = {result['planned_tokens']:,} tokens per model, "
        f"cosine, 1 % warmup; peak LR MF {info['memoryformer']['lr']:g}, dense {info['dense']['lr']:g}; same seed and batches",
        "",
        "| step | tokens | MF val PPL | dense val PPL | MF / dense | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = "end of schedule" if r["schedule_done"] else "mid-schedule (LR not yet decayed)"
        lines.append(
            f"| {r['step']} | {r['tokens']:,} | {r['memoryformer']['val_ppl']:.2f} | {r['dense']['val_ppl']:.2f} | "
            f"{r['ppl_ratio']:.3f} | {note} |"
        )
    lines += ["", "| model | dense params | table params | fwd FLOPs/token | train tokens/s |", "|---|---|---|---|---|"]
    for k, v in result["models"].items():
        p = v["params"] or {}
        tps = f"{v['tokens_per_s']:,.0f}" if v["tokens_per_s"] else "-"
        lines.append(f"| {v['preset']} | {p.get('dense', 0) / 1e6:.2f} M | {p.get('table', 0) / 1e6:.2f} M | "
                     f"{v['flops_per_token'] / 1e6:.2f} M | {tps} |")
    lines += ["", f"Goal: {result['goal']}. "
              + ("Status: run incomplete." if not result["complete"] else f"Met: {'yes' if result['goal_met'] else 'no'}"
                 f" (ratio {last['ppl_ratio']:.3f}).")]
    if args.note:
        lines += ["", "Notes:", "", *[f"- {n}" for n in args.note]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
