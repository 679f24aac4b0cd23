"""Quality at equal tokens: a MemoryFormer preset (or a variant of it) vs its dense control, same data and batches.

    python benchmarks/quality.py --config micro --tokens 5e6 \\
        --data ../shared/data/corpus/gutenberg_en/gutenberg_en.train.00.jsonl.xz \\
        --val-data ../shared/data/corpus/gutenberg_en/gutenberg_en.val.jsonl.xz
    python benchmarks/quality.py --config micro --tokens 1e6 --rounds 4 --seeds 0 1 2 --tag 1M_paper \\
        --mf-set weighting=paper --data ... --val-data ...

Both models follow the training recipe (memoryformer.train) with their default LRs (MemoryFormer 3x the dense
control's) and the same seed, so they see identical batches. Training runs in rounds (memoryformer.studies.rounds):
each model in turn advances to the next token milestone (`--rounds` of them), both are evaluated on the same fixed
validation windows, and the results files are rewritten. An interrupted benchmark still reports an equal-token
comparison (mid-schedule, marked as such), and re-running the same command continues where it stopped.

Variants of the MemoryFormer side: `--mf-set KEY=VALUE` changes a model field, `--train-set KEY=VALUE` a training
field of the MemoryFormer run only (e.g. table_optim=rowwise); each variant trains in its own run folder against the
same dense control, which trains once per seed and is reused by every variant (`--dense-from JSON` takes its numbers
from an earlier results file of the same schedule instead). `--max-rounds N` stops after the first N milestones.
`--seeds S ...` repeats the comparison for each seed (run folders OUT/seed<S>/) and adds a summary with the mean and
spread over seeds of the final validation PPLs and of the MemoryFormer / dense ratio. `--variant-only` trains just
the variant to every milestone, e.g. while the shared dense control is still being trained by another process.

Writes benchmarks/results/quality_<config>_<device>[_<tag>][_seed<S>].{json,md} (+ _seeds.{json,md}).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from memoryformer import data as data_mod
from memoryformer.config import DENSE_CONTROL, get_config
from memoryformer.flops import forward_flops_per_token
from memoryformer.studies.rounds import Contender, Interrupted, milestones, run_rounds
from memoryformer.train import TrainConfig, default_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv):
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
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="repeat for each seed and summarise")
    ap.add_argument("--results", default=str(RESULTS), help="folder for quality_*.{json,md}")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    ap.add_argument("--tag", default="", help="suffix of the results' file names: quality_<config>_<device>_<tag>")
    ap.add_argument("--mf-set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a model field of the MemoryFormer preset (repeatable), e.g. weighting=paper")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a training field of the MemoryFormer run (repeatable), e.g. table_optim=rowwise")
    ap.add_argument("--max-rounds", type=int, default=None, help="stop after this many milestones")
    ap.add_argument("--dense-from", metavar="JSON", default=None,
                    help="take the dense control's numbers from an earlier results file of the same schedule")
    ap.add_argument("--variant-only", action="store_true",
                    help="only train the MemoryFormer run to every milestone (no dense control, no results files); "
                    "the same command without this flag then compares it, training nothing it already has")
    args = ap.parse_args(argv)
    args.mf_over, args.train_over = _pairs(ap, "--mf-set", args.mf_set), _pairs(ap, "--train-set", args.train_set)
    return ap, args


def _pairs(ap, flag: str, items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"{flag}: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> dict:
    ap, args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in argv)
    dev = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = f"quality_{args.config}_{dev}{'_' + args.tag if args.tag else ''}"
    seeds = args.seeds or [args.seed]
    per_seed = {}
    try:
        for seed in seeds:
            out = Path(args.out) / f"seed{seed}" if args.seeds else Path(args.out)
            per_seed[seed] = run_seed(ap, args, seed, out, res_dir / (stem + (f"_seed{seed}" if args.seeds else "")),
                                      command, dev)
    except Interrupted:
        raise SystemExit(130) from None
    if args.seeds and not args.variant_only:
        return write_seeds(res_dir / f"{stem}_seeds", args, command, per_seed)
    return per_seed[seeds[0]]


def _variant_dir(config: str, mf_over: dict, train_over: dict) -> str:
    return f"{config}-memoryformer" + "".join(f"-{k}={v}" for k, v in {**mf_over, **train_over}.items())


def run_seed(ap, args, seed: int, out: Path, stem: Path, command: str, dev: str) -> dict:
    mf_cfg, dense_cfg = get_config(args.config, **args.mf_over), get_config(DENSE_CONTROL[args.config])
    seq_len = args.seq_len or mf_cfg.max_seq_len
    total_steps = max(1, math.ceil(args.tokens / (args.batch_size * seq_len)))
    marks = milestones(total_steps, args.rounds)[: args.max_rounds]
    base = TrainConfig(
        data=args.data, val_data=args.val_data, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        seq_len=seq_len, max_steps=total_steps, eval_every=0, eval_tokens=args.eval_tokens, log_every=10,
        ckpt_every=0, keep_checkpoints=1, seed=seed, device=args.device, progress=sys.stderr.isatty(),
    )
    mf_label = args.config + "".join(f" {k}={v}" for k, v in {**args.mf_over, **args.train_over}.items())
    contenders = [Contender("memoryformer", mf_cfg, out / _variant_dir(args.config, args.mf_over, args.train_over),
                            dict(args.train_over))]
    if args.variant_only:  # the dense control's folder is left alone (another process may be training it)
        run_rounds(contenders, base, marks, log=lambda m: print(m, file=sys.stderr, flush=True))
        return {"variant_only": str(contenders[0].run_dir)}
    dense_rows = _dense_from(ap, args, total_steps, seq_len) if args.dense_from else None
    if dense_rows is None:
        contenders.append(Contender("dense", dense_cfg, out / f"{args.config}-dense"))
    info = {"memoryformer": {"preset": mf_label, "lr": default_lr(mf_cfg), "params": None, "tokens_per_s": None},
            "dense": {"preset": DENSE_CONTROL[args.config], "lr": default_lr(dense_cfg), "params": None,
                      "tokens_per_s": None}}
    if dense_rows is not None:
        info["dense"].update(dense_rows.pop("_model"))
    rows: list[dict] = []
    t_start = time.time()
    geometry = dict(seq_len=seq_len, total_steps=total_steps, seed=seed, configs=(mf_cfg, dense_cfg))

    def on_round(ms: int, got: dict) -> None:
        row = {"step": ms, "tokens": ms * args.batch_size * seq_len, "schedule_done": ms == total_steps}
        for key, s in got.items():
            info[key]["params"], info[key]["tokens_per_s"] = s["params"], s["tokens_per_s"]
            row[key] = {"val_loss": round(s["val_loss"], 5), "val_ppl": round(math.exp(s["val_loss"]), 3),
                        "train_loss": s["train_loss"]}
        if dense_rows is not None:
            if ms not in dense_rows:
                ap.error(f"--dense-from: {args.dense_from} has no dense result at step {ms}")
            row["dense"] = dense_rows[ms]
        row["ppl_ratio"] = round(row["memoryformer"]["val_ppl"] / row["dense"]["val_ppl"], 4)
        rows.append(row)
        write(stem, args, command, dev, geometry, rows, info, t_start)
        print(f"[seed {seed}, {ms}/{total_steps} steps] MF val ppl {row['memoryformer']['val_ppl']:.2f}, "
              f"dense {row['dense']['val_ppl']:.2f}, ratio {row['ppl_ratio']:.3f}", flush=True)

    run_rounds(contenders, base, marks, on_round, log=lambda m: print(m, file=sys.stderr, flush=True))
    return write(stem, args, command, dev, geometry, rows, info, t_start)


def _dense_from(ap, args, total_steps: int, seq_len: int) -> dict:
    prior = json.loads(Path(args.dense_from).read_text())
    for key, want in (("total_steps", total_steps), ("batch_size", args.batch_size), ("seq_len", seq_len),
                      ("eval_tokens", args.eval_tokens)):
        if prior.get(key) != want:
            ap.error(f"--dense-from: {args.dense_from} has {key}={prior.get(key)!r}, this run {want!r}")
    rows = {r["step"]: r["dense"] for r in prior["milestones"]}
    rows["_model"] = {k: v for k, v in prior["models"]["dense"].items() if k != "flops_per_token"}
    return rows


def write(stem: Path, args, command: str, dev: str, geo: dict, rows: list[dict], info: dict, t_start: float) -> dict:
    last = rows[-1] if rows else None
    mf_cfg, dense_cfg = geo["configs"]
    result = {
        "benchmark": "quality at equal tokens",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(torch.device(dev)),
        "torch": torch.__version__,
        "command": command,
        "config": args.config,
        "mf_overrides": args.mf_over,
        "train_overrides": args.train_over,
        "seed": geo["seed"],
        "data": data_mod.describe(args.data, args.val_data),
        "seq_len": geo["seq_len"],
        "batch_size": args.batch_size,
        "tokens_per_step": args.batch_size * geo["seq_len"],
        "total_steps": geo["total_steps"],
        "planned_tokens": geo["total_steps"] * args.batch_size * geo["seq_len"],
        "eval_tokens": args.eval_tokens,
        "dense_from": args.dense_from,
        "wall_s_this_invocation": round(time.time() - t_start, 1),
        "models": {k: {**v, "flops_per_token": forward_flops_per_token(c, geo["seq_len"])}
                   for (k, v), c in zip(info.items(), (mf_cfg, dense_cfg))},
        "milestones": rows,
        "complete": bool(last and last["schedule_done"]),
        "final": last,
        "goal": "MemoryFormer val PPL <= 0.95 x the dense control's",
        "goal_met": bool(last and last["ppl_ratio"] <= 0.95),
        "notes": args.note,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(_markdown(result, info)) + "\n")
    return result


def _markdown(r: dict, info: dict) -> list[str]:
    lines = [
        f"# Quality: MF-{info['memoryformer']['preset']} vs {info['dense']['preset']} at equal tokens (seed {r['seed']})",
        "",
        f"- date: {r['date']}; device: {r['device']}; torch {r['torch']}",
        f"- command: `{r['command']}`",
        f"- data: train {', '.join(r['data']['train']['sources'])}; val {', '.join(r['data']['val']['sources'])}"
        f" ({r['eval_tokens']:,} fixed validation tokens per comparison)",
        f"- schedule: {r['total_steps']} steps x {r['batch_size']} x {r['seq_len']} = {r['planned_tokens']:,} tokens "
        f"per model, cosine, 1 % warmup; peak LR MF {info['memoryformer']['lr']:g}, dense {info['dense']['lr']:g}; "
        "same seed and batches" + (f"; dense numbers from {r['dense_from']}" if r["dense_from"] else ""),
        "",
        "| step | tokens | MF val PPL | dense val PPL | MF / dense | note |",
        "|---|---|---|---|---|---|",
    ]
    for m in r["milestones"]:
        note = "end of schedule" if m["schedule_done"] else "mid-schedule (LR not yet decayed)"
        lines.append(f"| {m['step']} | {m['tokens']:,} | {m['memoryformer']['val_ppl']:.2f} | "
                     f"{m['dense']['val_ppl']:.2f} | {m['ppl_ratio']:.3f} | {note} |")
    lines += ["", "| model | dense params | table params | fwd FLOPs/token | train tokens/s |", "|---|---|---|---|---|"]
    for v in r["models"].values():
        p = v["params"] or {}
        tps = f"{v['tokens_per_s']:,.0f}" if v["tokens_per_s"] else "-"
        lines.append(f"| {v['preset']} | {p.get('dense', 0) / 1e6:.2f} M | {p.get('table', 0) / 1e6:.2f} M | "
                     f"{v['flops_per_token'] / 1e6:.2f} M | {tps} |")
    last = r["final"]
    lines += ["", f"Goal: {r['goal']}. " + ("Status: run incomplete." if not r["complete"] else
              f"Met: {'yes' if r['goal_met'] else 'no'} (ratio {last['ppl_ratio']:.3f}).")]
    if r["notes"]:
        lines += ["", "Notes:", "", *[f"- {n}" for n in r["notes"]]]
    return lines


def spread(xs: list[float]) -> dict:
    """Mean, sample standard deviation and range of a few per-seed numbers."""
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def write_seeds(stem: Path, args, command: str, per_seed: dict[int, dict]) -> dict:
    done = {s: r for s, r in per_seed.items() if r["complete"]}
    keys = {"mf_ppl": lambda r: r["final"]["memoryformer"]["val_ppl"], "dense_ppl": lambda r: r["final"]["dense"]["val_ppl"],
            "ratio": lambda r: r["final"]["ppl_ratio"]}
    stats = {k: spread([f(r) for r in done.values()]) for k, f in keys.items()} if done else {}
    any_r = next(iter(per_seed.values()))
    out = {"benchmark": "quality at equal tokens over seeds", "command": command, "config": args.config,
           "mf_overrides": args.mf_over, "train_overrides": args.train_over, "device": any_r["device"],
           "date": any_r["date"], "planned_tokens": any_r["planned_tokens"], "seeds": sorted(per_seed),
           "complete_seeds": sorted(done), "per_seed": {str(s): r["final"] for s, r in per_seed.items()},
           "tokens_per_s": {k: [r["models"][k]["tokens_per_s"] for r in per_seed.values()] for k in ("memoryformer", "dense")},
           "stats": stats}
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    label = any_r["models"]["memoryformer"]["preset"]
    lines = [f"# Quality over seeds: MF-{label} vs {any_r['models']['dense']['preset']}, "
             f"{any_r['planned_tokens']:,} tokens each", "",
             f"- date: {out['date']}; device: {out['device']}", f"- command: `{command}`", "",
             "| seed | MF val PPL | dense val PPL | MF / dense |", "|---|---|---|---|"]
    for s, r in sorted(per_seed.items()):
        f = r["final"]
        lines.append(f"| {s} | {f['memoryformer']['val_ppl']:.2f} | {f['dense']['val_ppl']:.2f} | {f['ppl_ratio']:.4f} |"
                     + ("" if r["complete"] else " (incomplete)"))
    if stats:
        fmt = lambda st, p: f"{st['mean']:.{p}f} ± {st['std']:.{p}f} (range {st['min']:.{p}f}–{st['max']:.{p}f})"  # noqa: E731
        lines += ["", f"Over {len(done)} seeds (mean ± sample std): MF {fmt(stats['mf_ppl'], 2)}, dense "
                      f"{fmt(stats['dense_ppl'], 2)}, MF / dense {fmt(stats['ratio'], 4)}."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
