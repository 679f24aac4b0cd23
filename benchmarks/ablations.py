"""Run the ablation suites at micro scale on CPU and write benchmarks/results/ablations_<suite>_<scale>.{md,json}.

    python benchmarks/ablations.py --tokens 250000              # the default schedule, then every remaining variant
    python benchmarks/ablations.py --suites expand-bits --tokens 300000

Not part of the test suite: each variant is a real training run (a quarter of a million tokens takes about 15 to 20
minutes on two shared CPU cores). Variants run in `SCHEDULE` order, most informative first, so that a run stopped
early has answered the main questions; finished variants are reused (across suites too: they share a baseline),
so the script can simply be started again. Tables are rewritten after every variant. With `--analyze`, the bucket
analysis (Figure 4) of each finished checkpoint goes to benchmarks/results/buckets_<suite>_<scale>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memoryformer.studies import ablate

RESULTS = Path(__file__).resolve().parent / "results"
# (suite, variant): the shared baseline, the paper-vs-code weighting question, Table 5's extremes, then the rest.
SCHEDULE = [
    ("expand-bits", "bits=2"), ("weighting", "paper, t=1"), ("expand-bits", "bits=0"), ("expand-bits", "bits=3"),
    ("expand-bits", "bits=1"), ("weighting", "paper, t=0.5"), ("weighting", "release, t=0.5"), ("gelu", "GeLU"),
]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def analyze_suite(res: dict, out_root: Path, scale: str, n_tokens: int) -> None:
    from memoryformer.analyze import analyze_checkpoint

    path = RESULTS / f"buckets_{res['suite'].replace('-', '_')}_{scale}.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for v in res["variants"]:
        if v["name"] in done or not v.get("checkpoint"):
            continue
        if json.loads((Path(v["checkpoint"]) / "config.json").read_text()).get("arch") != "memoryformer":
            continue  # the attention suite's dense controls have no buckets
        out = out_root / scale / "buckets" / ablate._slug(f"{res['suite']}-{v['name']}")
        s = analyze_checkpoint(v["checkpoint"], out, n_tokens=n_tokens, progress=False)
        done[v["name"]] = {"tokens": s["tokens"], "by_kind": s["by_kind"],
                           "per_layer": {k: {**{m: x[m] for m in ("mean_unused", "mean_entropy", "mean_max_over_mean")},
                                             "weight_p50": x["scores"]["p50"]}
                                         for k, x in s["layers"].items()},
                           "png": str(out / "buckets.png")}
        log(f"buckets {res['suite']} {v['name']}: {json.dumps(s['by_kind'])}")
        path.write_text(json.dumps(done, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="expand-bits,weighting,gelu,tau,lr,attention")
    ap.add_argument("--scale", default="micro")
    ap.add_argument("--tokens", type=int, default=250_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--analyze", action="store_true", help="bucket analysis of each finished checkpoint")
    ap.add_argument("--analyze-tokens", type=int, default=65_536)
    a = ap.parse_args()
    names = list(ablate.SUITE_NAMES) if a.suites == "all" else a.suites.split(",")
    kw = dict(scale=a.scale, tokens=a.tokens, out=a.out, batch_size=a.batch_size, eval_tokens=a.eval_tokens,
              progress=False, log=log, results_dir=RESULTS)
    steps = [(s, [v]) for s, v in SCHEDULE if s in names] + [(s, None) for s in names]
    for suite, only in steps:
        t0 = time.time()
        res = ablate.run_suite(suite, only=only, **kw)
        if only is None:
            print(ablate.format_markdown(res), flush=True)
            log(f"{suite}: complete={res['complete']} ({time.time() - t0:.0f} s)")
        if a.analyze and (only is None or suite == "weighting"):
            analyze_suite(res, Path(a.out), a.scale, a.analyze_tokens)


if __name__ == "__main__":
    main()
