"""Training speed on CPU: MemoryFormer with each table option vs its dense control, same batches, interleaved.

    python benchmarks/train_speed.py --config tiny --seq-len 512 --batch-size 4 --rounds 3

Every candidate runs in its own fresh process for each round (so one candidate's memory never sits beside
another's and each gets a clean peak RSS), the candidates taking turns round after round (A B C A B C ...):
build the model as the trainer does (seeded init, `cast_tables`, `build_optimizer`), then `--warmup` untimed and
`--steps` timed optimizer steps on windows of the bundled text sample (or `--init CKPT`'s weights, to time a
trained model whose hashes hit fewer rows). A step is what `memoryformer.train` does: forward + backward per
micro-batch, clip, optimizer step, zero_grad. Reported: the median step time over all timed steps of all rounds,
tokens/s, its split into forward+backward and clip+step, the share of table rows hit per micro-batch, and the
worker's peak RSS. Writes benchmarks/results/train_speed_<config>_<device>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (arch, table_optim, table_dtype, sparse_rows)
CANDIDATES = {
    "dense": ("dense", "adamw", "float32", None),
    "adamw": ("mf", "adamw", "float32", None),
    "adamw-bf16": ("mf", "adamw", "bfloat16", None),
    "rowwise": ("mf", "rowwise", "float32", True),
    "rowwise-dense-grad": ("mf", "rowwise", "float32", False),
    "rowwise-bf16": ("mf", "rowwise", "bfloat16", True),
    "rowwise-bf16-dense-grad": ("mf", "rowwise", "bfloat16", False),
    "partial-rowwise-adam": ("mf", "partial-rowwise-adam", "float32", True),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="MemoryFormer preset (its dense control runs as 'dense')")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: the whole batch in one forward")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per candidate per round")
    ap.add_argument("--init", default=None, help="start the MemoryFormer candidates from this checkpoint's weights")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    ap.add_argument("--exact-rss", action="store_true",
                    help="workers return freed memory to the OS at once (MALLOC_MMAP_THRESHOLD_=65536), so the peak "
                    "RSS follows the live tensors instead of what glibc keeps for reuse")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="add this invocation's rounds to those of an earlier results file of the same settings "
                    "(rounds spread over several short quiet windows)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> dict:
    """One candidate, one round: build, warm up, time; print a JSON line."""
    from memoryformer import data as data_mod
    from memoryformer.checkpoint import load_model
    from memoryformer.config import DENSE_CONTROL, get_config
    from memoryformer.model import build_model
    from memoryformer.optim import build_optimizer, cast_tables
    from memoryformer.train import TrainConfig, default_lr

    if args.threads:
        torch.set_num_threads(args.threads)
    arch, table_optim, table_dtype, sparse = CANDIDATES[args.worker]
    cfg = get_config(DENSE_CONTROL[args.config] if arch == "dense" else args.config)
    tokens = data_mod.load_tokens(None, "train", progress=False)
    rss_before = _rss_mb()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    if args.init and arch == "mf":
        model.load_state_dict(load_model(args.init).state_dict())
    cast_tables(model, table_dtype)
    tcfg = TrainConfig(out="unused", table_optim=table_optim, table_dtype=table_dtype)
    opt = build_optimizer(model, tcfg, lr=default_lr(cfg), sparse_rows=sparse)
    micro = args.micro_batch_size or args.batch_size
    accum = args.batch_size // micro
    gen = torch.Generator().manual_seed(1000 + args.round)
    tables = [(n, p) for n, p in model.named_parameters() if n.endswith("tables")]
    fb, cs, total, hit = [], [], [], []
    for i in range(args.warmup + args.steps):
        starts = torch.randint(0, len(tokens) - args.seq_len - 1, (args.batch_size,), generator=gen).numpy()
        t0 = time.perf_counter()
        for a in range(accum):
            x = data_mod.windows(tokens, starts[a * micro:(a + 1) * micro], args.seq_len + 1)
            _, loss = model(x[:, :-1], x[:, 1:])
            (loss / accum).backward()
        t1 = time.perf_counter()
        if tables and i == args.warmup:  # rows hit by this step's micro-batches (all of them: accumulated)
            hit.append(_hit_fraction(tables))
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= args.warmup:
            fb.append(t1 - t0)
            cs.append(t2 - t1)
            total.append(t2 - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = dict(candidate=args.worker, round=args.round, step_s=total, fwd_bwd_s=fb, clip_step_s=cs,
               rss_before_model_mb=round(rss_before, 1), peak_rss_mb=round(peak, 1),
               hit_fraction=hit[0] if hit else None, threads=torch.get_num_threads(), loss=float(loss))
    print("RESULT " + json.dumps(out), flush=True)
    return out


def _hit_fraction(tables) -> float:
    hit = rows = 0
    for _, p in tables:
        g = p.grad
        if g is None:
            continue
        K, R, h = p.shape
        if g.is_sparse:
            hit += g.coalesce().indices().shape[1]
        else:
            hit += int((torch.linalg.vector_norm(g.view(K * R, h), dim=1) > 0).sum())
        rows += K * R
    return hit / max(1, rows)


def _predicted(args, candidate: str, hit_fraction: float | None) -> float:
    from memoryformer.config import DENSE_CONTROL
    from memoryformer.footprint import footprint

    arch, table_optim, table_dtype, sparse = CANDIDATES[candidate]
    micro = args.micro_batch_size or args.batch_size
    config = DENSE_CONTROL[args.config] if arch == "dense" else args.config
    accum = args.batch_size // micro
    hit = None if hit_fraction is None else min(1.0, hit_fraction / accum)  # measured over the step's micro-batches
    f = footprint(config, micro, args.seq_len, table_optim=table_optim, table_dtype=table_dtype, accum=accum,
                  sparse_rows=bool(sparse), device="cpu", hit_fraction=hit if sparse else None)
    return f["peak"]


def _prior_runs(args) -> tuple[dict[str, list[dict]], list[str]]:
    """The rounds of the results file `--merge` names (checked to be the same benchmark), or none."""
    runs: dict[str, list[dict]] = {c: [] for c in args.candidates}
    if not args.merge:
        return runs, []
    prior = json.loads(Path(args.merge).read_text())
    for key in ("config", "batch_size", "micro_batch_size", "seq_len", "init", "threads_arg", "exact_rss"):
        mine = getattr(args, "threads" if key == "threads_arg" else key)
        if key == "micro_batch_size":
            mine = mine or args.batch_size
        if prior.get(key) != mine:
            raise SystemExit(f"--merge: {args.merge} has {key}={prior.get(key)!r}, this run {mine!r}")
    for c, rs in prior["raw"].items():
        runs.setdefault(c, []).extend(rs)
    return runs, prior.get("loads", [])


def _run_rounds(args, argv: list[str], runs: dict[str, list[dict]]) -> None:
    """`--rounds` more rounds, each candidate in a fresh worker process, candidates interleaved."""
    here = Path(__file__).resolve()
    first = 1 + max((x["round"] for rs in runs.values() for x in rs), default=-1)
    for r in range(first, first + args.rounds):
        for c in args.candidates:
            cmd = [sys.executable, str(here), *argv, "--worker", c, "--round", str(r)]
            env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if args.exact_rss else {})}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if res.returncode or line is None:
                raise SystemExit(f"train_speed: worker {c} failed:\n{res.stderr[-3000:]}")
            runs[c].append(json.loads(line[len("RESULT "):]))
            print(f"[round {r}] {c}: median step {statistics.median(runs[c][-1]['step_s']):.3f} s", flush=True)


def _summary(args, runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians over all rounds per candidate, with the accounting's prediction for the same run."""
    tokens_per_step = args.batch_size * args.seq_len
    summary = {}
    for c, rs in runs.items():
        steps = [t for r in rs for t in r["step_s"]]
        med = statistics.median(steps)
        summary[c] = dict(
            step_s=round(med, 4), tokens_per_s=round(tokens_per_step / med, 1),
            fwd_bwd_s=round(statistics.median([t for r in rs for t in r["fwd_bwd_s"]]), 4),
            clip_step_s=round(statistics.median([t for r in rs for t in r["clip_step_s"]]), 4),
            peak_rss_mb=max(r["peak_rss_mb"] for r in rs), rss_before_model_mb=min(r["rss_before_model_mb"] for r in rs),
            hit_fraction=rs[0]["hit_fraction"], n_steps=len(steps), rounds=len(rs),
        )
    for c, s in summary.items():  # the accounting's prediction for the same run (memoryformer.footprint)
        s["predicted_mb"] = round(_predicted(args, c, s["hit_fraction"]) / 2**20, 1)
        s["measured_mb"] = round(s["peak_rss_mb"] - s["rss_before_model_mb"], 1)
    return summary


def _markdown(args, result: dict) -> list[str]:
    summary, loads = result["candidates"], result["loads"]
    ref = summary.get("dense", {}).get("tokens_per_s")
    lines = [f"# Training speed on CPU: MF-{args.config} table options vs the dense control", "",
             f"- date: {result['date']}; device: {result['device']}; torch {result['torch']}",
             f"- command: `{result['command']}`",
             *[f"- invocation {i + 1}: {x}" for i, x in enumerate(loads)],
             f"- {args.batch_size} x {args.seq_len} = {args.batch_size * args.seq_len:,} tokens per step (micro-batch "
             f"{result['micro_batch_size']}); {args.steps} timed steps per candidate per round, each round in a fresh "
             "process, candidates interleaved; medians over all rounds"
             + (f"; weights from {args.init}" if args.init else ""),
             "", "| candidate | step | tokens/s | vs dense | fwd+bwd | clip+step | rows hit / step | peak RSS | "
             "training memory: measured | predicted |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c, s in summary.items():
        rel = f"{s['tokens_per_s'] / ref:.2f}x" if ref else "-"
        hitf = f"{100 * s['hit_fraction']:.0f} %" if s["hit_fraction"] is not None else "-"
        lines.append(f"| {c} | {s['step_s']:.3f} s | {s['tokens_per_s']:,.0f} | {rel} | {s['fwd_bwd_s']:.3f} s | "
                     f"{s['clip_step_s']:.3f} s | {hitf} | {s['peak_rss_mb'] / 1024:.2f} GB | "
                     f"{s['measured_mb'] / 1024:.2f} GB | {s['predicted_mb'] / 1024:.2f} GB "
                     f"({s['predicted_mb'] / s['measured_mb'] - 1:+.0%}) |")
    lines += ["", "Training memory, measured: the worker's peak RSS minus its RSS before the model was built (Python, "
              "torch, the token sample)" + (", with glibc returning freed blocks at once (MALLOC_MMAP_THRESHOLD_="
              "65536)" if args.exact_rss else ", default glibc allocator (it keeps freed heap blocks for reuse)")
              + ". Predicted: `memoryformer.footprint.footprint(..., device='cpu')` for the same micro-batch, "
              "accumulation and table option, with the measured share of rows hit for sparse rows."]
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from kernel_timing import device_name, load

    argv = sys.argv[1:] if argv is None else argv
    if args.threads:
        torch.set_num_threads(args.threads)  # for the device name
    runs, loads = _prior_runs(args)
    load_start = load()
    _run_rounds(args, argv, runs)
    loads.append(f"{load_start} at start, {load()} at end")
    result = {
        "benchmark": "training speed (CPU)", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(torch.device("cpu")), "threads": runs[args.candidates[0]][-1]["threads"],
        "torch": torch.__version__, "command": "python benchmarks/train_speed.py " + " ".join(argv),
        "config": args.config, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size or args.batch_size,
        "seq_len": args.seq_len, "init": args.init, "threads_arg": args.threads, "exact_rss": args.exact_rss,
        "loads": loads, "candidates": _summary(args, runs), "raw": runs,
    }
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    stem = Path(args.results) / f"train_speed_{args.config}_cpu{'_' + args.tag if args.tag else ''}_{date}"
    if args.merge:
        stem = Path(args.merge).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = _markdown(args, result)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
