"""The kernels' own thread pool against at::parallel_for (torch's intra-op pool) on the compiled engine's decode step:
tokens/s of MF-micro / MF-tiny / MF-small, batch 1, greedy, with each implementation (`cpu_ext.parallel`), in
interleaved rounds (the implementation that starts alternates), medians, the 1-minute load average beside each figure.

    python benchmarks/pool.py --threads 2 --save      # 192 new tokens after 32: within MF-micro's 256 positions

Both implementations run the same chunks (parallel.h), so the outputs are bitwise equal; checked here once per model.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_timing import PRECISIONS, mf_model, one_min_load, run_engine  # noqa: E402
from kernel_timing import RESULTS, device_name, header, load, slug  # noqa: E402

from memoryformer import inference as inf  # noqa: E402
from memoryformer.ops import cpu_ext  # noqa: E402

IMPLS = ("pool", "aten")


def same_logits(model, prompt: torch.Tensor) -> bool:
    """Prefill + 4 steps through each implementation: bitwise the same logits."""
    outs = []
    for impl in IMPLS:
        cpu_ext.parallel(impl)
        eng = inf.DecodeEngine(model, max_seq_len=prompt.shape[1] + 5)
        lg = [eng.prefill(prompt)]
        for _ in range(4):
            lg.append(eng.step(lg[-1].argmax(-1)))
        outs.append(torch.stack(lg))
    return all(torch.equal(outs[0], o) for o in outs[1:])


def measure(size: str, args) -> dict:
    """Interleaved rounds of `args.new` decode steps per implementation on one model; medians and loads."""
    model = mf_model(size, args.precision)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    equal = same_logits(model, prompt[:, :8])
    rates: dict[str, list[float]] = {i: [] for i in IMPLS}
    loads: dict[str, list[float]] = {i: [] for i in IMPLS}
    for r in range(args.rounds):
        for impl in IMPLS[r % 2:] + IMPLS[: r % 2]:
            cpu_ext.parallel(impl)
            run_engine(model, prompt[:, :4], 4)  # warm-up: the engine's buffers, the threads
            loads[impl].append(one_min_load())
            _, dec = run_engine(model, prompt, args.new)
            rates[impl].append(args.new / dec)
            print(f"  mf-{size}-{args.precision} round {r} {impl}: {rates[impl][-1]:.1f} tok/s "
                  f"(load {loads[impl][-1]:.2f})", flush=True)
    del model
    gc.collect()
    med = {i: statistics.median(v) for i, v in rates.items()}
    spread = {i: (min(v), max(v)) for i, v in rates.items()}
    return dict(model=f"mf-{size}-{args.precision}", median=med, range=spread, rounds=rates, loads=loads,
                pool_over_aten=med["pool"] / med["aten"], bitwise_equal=equal)


def report(rows: list[dict], args) -> list[str]:
    lines = [
        f"## Decode step, batch 1, {args.prompt}-token prompt, {args.new} new tokens, {args.threads} threads, "
        f"median of {args.rounds} interleaved rounds",
        "",
        "1-minute load average read just before each round, listed in round order.",
        "",
        "| model | pool tok/s (min-max) | aten tok/s (min-max) | pool / aten | load, pool rounds | load, aten rounds "
        "| same logits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (pl, ph), (al, ah) = r["range"]["pool"], r["range"]["aten"]
        lines.append(
            f"| {r['model']} | {r['median']['pool']:.1f} ({pl:.1f}-{ph:.1f}) | {r['median']['aten']:.1f} "
            f"({al:.1f}-{ah:.1f}) | {r['pool_over_aten']:.3f} | {', '.join(f'{x:.2f}' for x in r['loads']['pool'])} "
            f"| {', '.join(f'{x:.2f}' for x in r['loads']['aten'])} | {'yes' if r['bitwise_equal'] else 'NO'} |")
    lines.append("")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["micro", "tiny", "small"])
    ap.add_argument("--precision", default="int8", choices=list(PRECISIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/pool_<device>_<date>.md/.json")
    args = ap.parse_args(argv)
    if cpu_ext.get() is None:
        sys.exit("the compiled CPU kernels are unavailable (see the log line above); the engine cannot run")
    torch.set_num_threads(args.threads)  # the aten implementation's threads
    cpu_ext.parallel("pool")
    cpu_ext.threads(args.threads)  # the pool's
    device = torch.device("cpu")
    lines = header("CPU decode: the kernels' thread pool vs at::parallel_for", device,
                   sys.argv if argv is None else ["benchmarks/pool.py", *argv])
    backend = torch.__config__.parallel_info().split("ATen parallel backend: ")[-1].strip()
    lines[-1:-1] = [f"- torch parallel backend: {backend}"]
    print("\n".join(lines), flush=True)
    rows = [measure(size, args) for size in args.configs]
    lines += report(rows, args) + [f"- {load()} at end"]
    print("\n".join(lines[-len(rows) - 8:]), flush=True)
    if args.save:
        stem = RESULTS / f"pool_{slug(device_name(device))}_{datetime.date.today().isoformat()}"
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        record = dict(device=device_name(device), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                      argv=sys.argv if argv is None else argv, torch=torch.__version__, rows=rows)
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {stem}.md / .json")
    cpu_ext.parallel("pool")
    return rows


if __name__ == "__main__":
    main()
