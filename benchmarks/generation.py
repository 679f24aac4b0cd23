"""Generation speed: MemoryFormer vs its dense control, with and without the KV cache, in the same run.

    python benchmarks/generation.py --threads 2 --save          # CPU, micro and micro-dense
    python benchmarks/generation.py --device cuda --configs tiny pythia-70m --save

Each model generates `--new` tokens greedily after a random `--prompt`-token prompt (prompt + new tokens stay within
max_seq_len, so the cache never slides). Weights are freshly initialised: speed does not depend on them. Prints
tokens/s per setting (median of interleaved repetitions), the cache's speed-up, and MemoryFormer / dense.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

import memoryformer as mf
from memoryformer.generate import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import RESULTS, device_name, fmt_time, header, load, slug, sync, time_interleaved  # noqa: E402


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["micro", "micro-dense"], help="presets (default micro micro-dense)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per measurement at most")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/generation_<device>_<date>.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    models = {}
    for name in args.configs:
        torch.manual_seed(0)
        cfg = mf.get_config(name)
        if args.prompt + args.new > cfg.max_seq_len:
            ap.error(f"--prompt + --new = {args.prompt + args.new} exceeds {name}'s max_seq_len={cfg.max_seq_len}")
        models[name] = mf.build_model(cfg).to(device=device, dtype=dtype).eval()

    lines = header("Generation: tokens/s with and without the KV cache", device, sys.argv if argv is None else
                   ["benchmarks/generation.py", *argv])
    lines += [
        f"Greedy decoding of {args.new} new tokens after a {args.prompt}-token prompt, {dtype} weights, "
        "median of interleaved repetitions; tokens/s counts new tokens of all rows.",
        "",
        "| model | batch | no cache | KV cache | cache speed-up | time per new token (cache) |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rates: dict[tuple[str, int], float] = {}
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        fns = {}
        for name, m in models.items():
            prompt = torch.randint(0, m.config.vocab_size, (b, args.prompt), generator=g).to(device)
            for cache in (False, True):
                def fn(m=m, prompt=prompt, cache=cache):
                    with torch.inference_mode():
                        generate(m, prompt, args.new, temperature=0, kv_cache=cache)
                    sync(device)
                fns[(name, cache)] = fn
        times = time_interleaved(fns, device, warmup=1, reps=args.reps, budget_s=args.budget)
        for name in models:
            off, on = times[(name, False)], times[(name, True)]
            rates[(name, b)] = b * args.new / on
            line = (f"| {name} | {b} | {b * args.new / off:,.0f} tok/s | {b * args.new / on:,.0f} tok/s | "
                    f"{off / on:.1f}x | {fmt_time(on / args.new)} |")
            print(line, flush=True)
            lines.append(line)
    mfs = [n for n in models if models[n].config.arch == "memoryformer"]
    dense = [n for n in models if models[n].config.arch == "transformer"]
    if mfs and dense:
        lines += ["", f"MemoryFormer / dense tokens/s with the cache ({mfs[0]} vs {dense[0]}): " + ", ".join(
            f"batch {b}: {rates[(mfs[0], b)] / rates[(dense[0], b)]:.2f}x" for b in args.batch)]
        print(lines[-1])
    lines += ["", f"- {load()} at end", ""]
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        day = datetime.date.today().isoformat()
        path = RESULTS / f"generation_{slug(device_name(device))}_{day}.md"
        path.write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {path}")
    return lines


if __name__ == "__main__":
    main()
