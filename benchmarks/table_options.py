"""Table options against the faithful AdamW fp32 recipe: validation PPL over seeds, training speed, memory.

    python benchmarks/table_options.py --runs runs/quality1m --seeds 0 1 2

Reads the run folders the quality benchmark trained (`benchmarks/quality.py --config micro --tokens 1e6 --rounds 4
--seeds S --out RUNS [--mf-set ...] --train-set ...`): RUNS/seed<S>/micro-memoryformer[-<model overrides>] (AdamW
fp32, the reference) and the same folder name + -<train overrides> (the options); `--mf-set` names the model
overrides as the quality runs were given them. For each option: the final validation PPL per
seed, its mean and sample standard deviation, the paired per-seed ratio to the reference (mean, range), the
training tokens/s the runs logged (they shared a loaded machine: indicative only; benchmarks/train_speed.py times
them interleaved), and the training memory of that geometry from memoryformer.footprint (CPU, the runs' micro-batch;
measured peaks in train_speed_*.md). Writes benchmarks/results/table_options_<config>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
from pathlib import Path

from memoryformer.footprint import footprint

RESULTS = Path(__file__).resolve().parent / "results"
OPTIONS = {  # folder suffix -> (label, table_optim, table_dtype, sparse rows on CPU)
    "": ("adamw / fp32 (recipe)", "adamw", "float32", False),
    "-table_optim=rowwise": ("rowwise / fp32", "rowwise", "float32", True),
    "-table_dtype=bfloat16": ("adamw / bf16", "adamw", "bfloat16", False),
    "-table_optim=rowwise-table_dtype=bfloat16": ("rowwise / bf16", "rowwise", "bfloat16", True),
    "-table_optim=partial-rowwise-adam": ("partial-rowwise-adam / fp32", "partial-rowwise-adam", "float32", True),
    "-table_optim=partial-rowwise-adam-table_dtype=bfloat16": ("partial-rowwise-adam / bf16", "partial-rowwise-adam",
                                                               "bfloat16", True),
}
BASE_GPU = dict(batch=4, seq_len=2048, gpu_mem="80GB")  # the target's geometry: MF-base on one 80 GB GPU


def final(run: Path) -> dict | None:
    """The run's last validation record and its summary, if it finished its schedule."""
    try:
        summary = json.loads((run / "summary.json").read_text())
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return None
    vals = [r for r in recs if "val_loss" in r]
    if not vals or summary.get("steps") != summary.get("total_steps"):
        return None
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return dict(val_loss=vals[-1]["val_loss"], val_ppl=math.exp(vals[-1]["val_loss"]), step=vals[-1]["step"],
                tokens_per_s=statistics.median(tps) if tps else None, tokens=vals[-1]["tokens"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/quality1m", help="the quality.py run folders (OUT/seed<S>/...)")
    ap.add_argument("--config", default="micro")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--mf-set", action="append", default=[], metavar="KEY=VALUE",
                    help="the model fields the runs were trained with (quality.py's --mf-set, part of their folder "
                    "names), e.g. weighting=release")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args(argv)
    runs = Path(a.runs)
    for item in a.mf_set:
        if "=" not in item:
            ap.error(f"--mf-set: expected KEY=VALUE, got {item!r}")
    model = f"{a.config}-memoryformer" + "".join(f"-{item}" for item in a.mf_set)
    table = {}
    for suffix, (label, optim, dtype, sparse) in OPTIONS.items():
        per = {s: final(runs / f"seed{s}" / f"{model}{suffix}") for s in a.seeds}
        ref = {s: final(runs / f"seed{s}" / model) for s in a.seeds}
        done = [s for s in a.seeds if per[s] and ref[s]]
        accum = a.batch_size // a.micro_batch_size
        fp = footprint(a.config, a.micro_batch_size, a.seq_len, table_optim=optim, table_dtype=dtype, accum=accum,
                       sparse_rows=sparse, device="cpu")
        row = dict(label=label, table_optim=optim, table_dtype=dtype, seeds=done,
                   val_ppl={s: round(per[s]["val_ppl"], 3) for s in a.seeds if per[s]},
                   tokens_per_s={s: per[s]["tokens_per_s"] for s in a.seeds if per[s]},
                   state_mb=round(fp["state"] / 2**20, 1), peak_mb=round(fp["peak"] / 2**20, 1))
        base = footprint("base", BASE_GPU["batch"], BASE_GPU["seq_len"], table_optim=optim, table_dtype=dtype,
                         device="cuda", gpu_mem=BASE_GPU["gpu_mem"])
        row.update(base_state_gb=round(base["state"] / 1e9, 1), base_total_gb=round(base["total"] / 1e9, 1),
                   base_fits=base["fits"])
        if done:
            ppl = [per[s]["val_ppl"] for s in done]
            ratio = [per[s]["val_ppl"] / ref[s]["val_ppl"] for s in done]
            row.update(ppl_mean=statistics.fmean(ppl), ppl_std=statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                       ratio_mean=statistics.fmean(ratio), ratio_min=min(ratio), ratio_max=max(ratio))
        table[suffix or "adamw"] = row
    out = {"benchmark": "table options vs AdamW fp32", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "runs": str(runs), "config": a.config, "mf_set": a.mf_set, "seeds": a.seeds, "options": table}
    stem = Path(a.results) / f"table_options_{a.config}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Table options vs the AdamW fp32 recipe: MF-{a.config}{' ' + ' '.join(a.mf_set) if a.mf_set else ''}, "
             f"1 M tokens, seeds {' '.join(map(str, a.seeds))}", "",
             f"- date: {out['date']}; runs: `{runs}` (benchmarks/quality.py, 245 steps x 16 x 256 tokens, cosine, "
             "peak LR 3e-3, same batches per seed)",
             "- val PPL: 131,072 fixed validation tokens at the end of the schedule; ratio: option / AdamW fp32 of "
             "the same seed",
             "- tokens/s: median logged by the runs on a shared, loaded 2-core machine (indicative only); memory: "
             f"memoryformer.footprint for micro-batch {a.micro_batch_size} x {a.seq_len}, {a.batch_size // a.micro_batch_size} "
             "micro-batches per step, CPU",
             f"- MF-base on one GPU: memoryformer.footprint for base, batch {BASE_GPU['batch']} x {BASE_GPU['seq_len']}, "
             f"CUDA (dense table gradients), training state and total against {BASE_GPU['gpu_mem']}", "",
             "| tables | seeds done | val PPL per seed | mean ± std | / AdamW fp32 (mean, range) | tokens/s | "
             "training state | peak | MF-base state | MF-base total (fits) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table.values():
        per_seed = ", ".join(f"{row['val_ppl'][s]:.2f}" if s in row["val_ppl"] else "-" for s in a.seeds)
        if row["seeds"]:
            stats = f"{row['ppl_mean']:.2f} ± {row['ppl_std']:.2f}"
            rat = (f"{row['ratio_mean']:.4f} ({row['ratio_min']:.4f}–{row['ratio_max']:.4f})"
                   if row["table_optim"] != "adamw" or row["table_dtype"] != "float32" else "1")
        else:
            stats = rat = "-"
        tps = [v for v in row["tokens_per_s"].values() if v]
        speed = f"{statistics.median(tps):,.0f}" if tps else "-"
        lines.append(f"| {row['label']} | {len(row['seeds'])} | {per_seed} | {stats} | {rat} | {speed} | "
                     f"{row['state_mb']:.0f} MB | {row['peak_mb']:.0f} MB | {row['base_state_gb']:.1f} GB | "
                     f"{row['base_total_gb']:.1f} GB ({'yes' if row['base_fits'] else 'no'}) |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
