"""Compare MemoryFormer variants trained with the same seeds: which is better beyond the spread over seeds?

    python benchmarks/compare_quality.py benchmarks/results/quality_micro_cpu_1M_release_seeds.json \\
        benchmarks/results/quality_micro_cpu_1M_paper_seeds.json [more ..._seeds.json] --out results.md

Each input is a `benchmarks/quality.py --seeds ...` summary. The first is the baseline. For every other variant the
final validation PPLs are paired seed by seed with the baseline's (same data, same batches), and the verdict is
"better" / "worse" only when every seed agrees in sign and the mean paired difference exceeds twice the standard
deviation of the paired differences; otherwise "within the seed spread". The dense control trains once per seed, so
the MF / dense ratios pair the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def label(res: dict) -> str:
    over = {**res.get("mf_overrides", {}), **res.get("train_overrides", {})}
    return ", ".join(f"{k}={v}" for k, v in over.items()) or "default recipe"


def paired(base: dict, other: dict, key: str) -> dict:
    """Per-seed differences other - base of the final `key` ("mf" PPL or "ratio") over the seeds both finished."""
    get = (lambda f: f["memoryformer"]["val_ppl"]) if key == "mf" else (lambda f: f["ppl_ratio"])
    seeds = sorted(set(base["per_seed"]) & set(other["per_seed"]), key=int)
    d = [get(other["per_seed"][s]) - get(base["per_seed"][s]) for s in seeds]
    if not d:
        return {"seeds": [], "verdict": "no common seeds"}
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if len(d) > 1 else float("inf")
    same_sign = all(x < 0 for x in d) or all(x > 0 for x in d)
    verdict = "within the seed spread"
    if same_sign and abs(mean) > 2 * sd:
        verdict = "better" if mean < 0 else "worse"
    return {"seeds": seeds, "diffs": d, "mean": mean, "std": sd, "verdict": verdict}


def fmt(st: dict, p: int) -> str:
    return f"{st['mean']:.{p}f} ± {st['std']:.{p}f}"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summaries", nargs="+", help="quality_*_seeds.json files; the first is the baseline")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args(argv)
    res = [json.loads(Path(p).read_text()) for p in args.summaries]
    base = res[0]
    lines = [f"Baseline: {label(base)} ({base['planned_tokens']:,} tokens, seeds {base['complete_seeds']}).", "",
             "| variant | MF val PPL (mean ± sd) | MF / dense (mean ± sd) | paired PPL difference vs baseline | verdict |",
             "|---|---|---|---|---|"]
    for r in res:
        st = r["stats"]
        if r is base:
            lines.append(f"| {label(r)} (baseline) | {fmt(st['mf_ppl'], 2)} | {fmt(st['ratio'], 4)} | - | - |")
            continue
        d = paired(base, r, "mf")
        diff = "n/a" if not d["seeds"] else f"{d['mean']:+.2f} ± {d['std']:.2f} ({', '.join(f'{x:+.2f}' for x in d['diffs'])})"
        lines.append(f"| {label(r)} | {fmt(st['mf_ppl'], 2)} | {fmt(st['ratio'], 4)} | {diff} | {d['verdict']} |")
    lines += ["", "Verdict: better/worse only when every seed agrees and |mean paired difference| > 2 sd of the "
              "paired differences."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
