"""The whole GPU check in one command: Triton kernels at real sizes, one layer, one block, training, decoding, tiles.

    PYTHONPATH=src python benchmarks/gpu_suite.py --out "$OUT/gpu"          # one H200: ~5-6 min, at most ~7.5
    PYTHONPATH=src python benchmarks/gpu_suite.py --out /tmp/gpu --parts a,f --time-budget 200
    PYTHONPATH=src python benchmarks/gpu_suite.py --out /tmp/gpu --dry-run  # CPU, Triton interpreter: ~1 min

Parts (letters for --parts):
  a  correctness: fused Triton layer (output, input and table gradients) and lookup op (output, weight and table
     gradients) against the float64 reference and F.embedding_bag; fp32/bf16 tables, d = 512/1024, N = 16384, both
     weightings, sorted and atomic table gradient; torch.library.opcheck of the ops; torch.compile(fullgraph=True)
     of a MemoryFormer block, forward + backward, against eager.
  b  one layer (d = 1024, tau = 8, N = 16384, bf16) against F.linear; row bytes/s of the forward.
  c  one block (B = 8, T = 2048, bf16 autocast, bf16 tables) against the Pythia block, d = 512 / 768 / 1024.
  d  training tokens/s and peak memory, 30 fused-AdamW steps: MF-tiny vs pythia-70m, MF-small vs pythia-160m.
  e  batch-1 greedy decode tokens/s: MF-tiny vs Hugging Face GPTNeoX at the Pythia-70M shape with a static cache.
  f  tile sweep of the forward, grad-weights and table-gradient kernels; the fastest go to `best_tiles`.

Writes DIR/suite.json (every figure, rewritten after each step, so a killed run keeps what it measured) and
DIR/summary.md (device, versions, date, targets met / not met). A part that raises is recorded (type, message,
traceback tail) and the rest still runs; a global time guard (--time-budget, default 450 s) skips what would not fit.
`--dry-run` runs the same code at tiny shapes on CPU under TRITON_INTERPRET=1 (tests/test_gpu_suite.py).
Weights are random and token ids are random: speed does not depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

START = time.monotonic()  # the time budget counts from here, imports included
if "--dry-run" in sys.argv[1:]:  # the interpreter is chosen when triton is imported, so before anything imports it
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_parts import (  # noqa: E402
    H100_EBAG_FWDBWD,
    PAIRS,
    _error,
    _free,
    part_block,
    part_correctness,
    part_decode,
    part_layer,
    part_tiles,
    part_training,
)
from kernel_timing import device_name, load, time_interleaved  # noqa: E402

PARTS = {"a": "correctness", "b": "layer", "c": "block", "d": "training", "e": "decode", "f": "tiles"}
GPU = dict(
    tau=8, dims=(512, 1024), n=16384, chunk=2048, compile=(2, 512, "inductor"), layer=(1024, 16384), blocks=PAIRS,
    batch=(8, 2048), train=PAIRS[:2], steps=(3, 30), decode=(32, 128, 2, 3), over={}, timing=(3, 20, 10.0),
    tiles=dict(fwd=[(16, 64), (32, 64), (64, 64), (16, 128), (32, 128), (32, 32)],
               bwd=[(16, 128), (32, 128), (32, 64), (64, 64), (16, 256)],
               seg=[(8, 128), (16, 128), (32, 128), (16, 64), (16, 256), (32, 64)]),
    est=dict(a=150, b=15, c=50, d=60, e=20, f=45, case=8, compile=60, block=15, train=12, hf_compile=90),
)
DRY = dict(  # the interpreter runs every Triton program in Python: few programs, i.e. small K * 2**tau and N
    tau=2, dims=(8,), n=32, chunk=16, compile=(1, 16, "eager"), layer=(8, 32), blocks=PAIRS[:1],
    batch=(1, 32), train=PAIRS[:1], steps=(1, 1), decode=(4, 2, 0, 1), timing=(1, 1, 1.0),
    over=dict(n_layer=1, d_model=8, n_head=1, max_seq_len=64, tau=2, vocab_size=256),
    tiles=dict(fwd=[(16, 64), (32, 64)], bwd=[(32, 128), (16, 64)], seg=[(16, 128), (8, 64)]),
    est={k: 1 for k in GPU["est"]},
)


class Suite:
    """Run state: sizes, clock and time guard, progress log, and the results written after every step."""

    def __init__(self, args, size: dict, device: torch.device):
        self.args, self.size, self.dev = args, size, device
        self.t0 = START
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = dict(meta=_meta(args, device), parts={}, skipped=[], targets=[], best_tiles={})

    def log(self, msg: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        print(f"[{now} +{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def fits(self, seconds: float, what: str) -> bool:
        """Whether `what` (estimated `seconds`) still fits the time budget; if not, record and say so."""
        left = self.args.time_budget - (time.monotonic() - self.t0)
        if seconds <= left:
            return True
        self.data["skipped"].append(f"{what}: needs ~{seconds:.0f} s, {max(left, 0):.0f} s left")
        self.log(f"skip {self.data['skipped'][-1]}")
        return False

    def time(self, fns: dict) -> dict[str, float]:
        warmup, reps, budget = self.size["timing"]
        return time_interleaved(fns, self.dev, warmup=warmup, reps=reps, budget_s=budget)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.data["targets"] = _targets(self.data)
        (self.out / "suite.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        try:
            text = _summary(self.data)
        except Exception as e:  # the JSON holds every figure; a summary bug must not stop the suite
            text = f"# summary failed\n\n```\n{_error(e)['traceback']}\n```\n"
        (self.out / "summary.md").write_text(text)


def _meta(args, device) -> dict:
    import transformers
    import triton

    meta = dict(device=device_name(device), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, python=sys.version.split()[0], cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join(sys.argv), dry_run=args.dry_run, time_budget_s=args.time_budget,
                load_start=load(), triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    if device.type == "cuda":
        meta["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return meta


def _get(data: dict, *keys):
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return data


def _targets(data: dict) -> list[dict]:
    def row(name, value, goal, met, stretch=None):
        shown = "n/a" if value is None else value if isinstance(value, str) else f"{value:.2f}x"
        return dict(target=name, value=value, measured=shown, goal=goal, met=met,
                    **({} if stretch is None else dict(stretch=stretch)))

    res = {k: _get(data, "parts", k, "results") or {} for k in PARTS}
    cases, ops = res["a"].get("cases", []), res["a"].get("opcheck", {})
    seen = (f"{sum(c['ok'] for c in cases)}/{len(cases)} cases, {sum(v == 'ok' for v in ops.values())}/{len(ops)} "
            f"opcheck, compile {_get(res['a'], 'compile', 'ok')}") if cases else None
    out = [row("correctness (a): every case, opcheck and compile check pass", seen, "all pass",
               res["a"].get("all_ok"))]
    blocks = [b for b in res["c"].get("blocks", []) if "fwdbwd" in b]
    big = max(blocks, key=lambda b: b["d"], default=None)
    r = big and big["fwdbwd"]["ratio"]
    out.append(row(f"block fwd+bwd MF / Pythia at d = {big['d'] if big else 1024} (c)", r, "<= 2x (stretch <= 1x)",
                   None if r is None else r <= 2.0, None if r is None else r <= 1.0))
    r = res["d"].get("ratios", {}).get("tiny/pythia-70m")
    out.append(row("MF-tiny training tokens/s / pythia-70m (d)", r, ">= 0.8x", None if r is None else r >= 0.8))
    ratios = res["e"].get("ratio_vs_hf", {})
    r = min(ratios.values()) if ratios else None
    out.append(row("MF-tiny batch-1 decode / fastest HF Pythia-70M static cache (e)", r, ">= 2x",
                   None if r is None else r >= 2.0))
    return out


def _figures(res: dict) -> list[str]:
    """One line per measured figure (or error) of each part."""
    def err(entry):
        return f"{entry.get('error', {}).get('type')}: {entry.get('error', {}).get('message', '')[:200]}"

    out, a, b = [], res["a"], res["b"]
    for c in a.get("cases", []):
        out.append(f"- a {c.get('dtype')} d={c.get('d')} {c.get('weighting')} {c.get('table_grad')}: " + (
            f"max error {c['max_error']:.2e} (tol {c['tol']}) {'ok' if c['ok'] else 'FAIL'}" if "errors" in c
            else err(c)))
    out += [f"- a {k}: {a[k]}"[:600] for k in ("opcheck", "compile") if k in a]
    if "fwd" in b:
        out.append(f"- b layer d={b['d']} N={b['n']}: fwd {b['fwd']['memory_layer_s'] * 1e6:.0f} us = "
                   f"{b['fwd']['ratio']:.2f}x F.linear, {b['row_bytes_per_s'] / 1e12:.2f} TB/s of rows; fwd+bwd "
                   f"{b['fwdbwd']['memory_layer_s'] * 1e6:.0f} us = {b['fwdbwd']['ratio']:.2f}x")
    for blk in res["c"].get("blocks", []):
        fb, h100 = blk.get("fwdbwd"), H100_EBAG_FWDBWD.get(blk.get("d"))
        out.append(f"- c block {blk['mf']}: " + (
            f"d={blk['d']}, MF / Pythia fwd {blk['fwd']['ratio']:.2f}x, fwd+bwd {fb['ratio']:.2f}x "
            f"({fb['memoryformer_s'] * 1e3:.2f} / {fb['pythia_s'] * 1e3:.2f} ms)"
            + (f"; with embedding_bag on an H100: {h100}x" if h100 else "") if fb else err(blk)))
    for name, v in res["d"].get("models", {}).items():
        out.append(f"- d training {name}: " + (f"{v['tokens_per_s']:,.0f} tokens/s, {v['step_s'] * 1e3:.1f} ms/step, "
                   f"peak {v['peak_memory_gb']} GB" if "tokens_per_s" in v else err(v)))
    out += [f"- e decode {k}: {v:,.1f} tokens/s" + (" (HF on an H100 earlier: 255)" if k.startswith("hf") else "")
            for k, v in res["e"].get("tokens_per_s", {}).items()]
    if res["f"].get("sweep"):
        out.append(f"- f best tiles {res['f']['best_tiles']} (default {res['f']['default_tiles']})")
        out += [f"- f {k}: " + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in v.items())
                for k, v in res["f"]["sweep"].items()]
    return out


def _summary(data: dict) -> str:
    m, word = data["meta"], {True: "met", False: "not met", None: "not measured"}
    out = [f"# MemoryFormer GPU suite{' (dry run: CPU, Triton interpreter, tiny shapes)' * m['dry_run']}", "",
           f"- device: **{m['device']}**" + (f" ({m['gpu_memory_gb']} GB)" if "gpu_memory_gb" in m else "")
           + f"; torch {m['torch']} (CUDA {m['cuda']}), "
           f"triton {m['triton']}, transformers {m['transformers']}, python {m['python']}",
           f"- {m['date']}; `{m['command']}`", f"- {m['load_start']} at start, {m.get('load_end', 'n/a')} at end; "
           f"{data.get('elapsed_s')} s of a {m['time_budget_s']:.0f} s budget", "",
           "| target | measured | goal | status |", "|---|---|---|---|"]
    out += [f"| {t['target']} | {t['measured']} | {t['goal']} | {word[t['met']]}"
            + (f" (stretch {word[t['stretch']]})" if "stretch" in t else "") + " |" for t in data["targets"]]
    out += ["", "| part | status | seconds | error |", "|---|---|---|---|"]
    for k, p in data["parts"].items():
        e = p.get("error", {})
        out.append(f"| {k} {p['name']} | {p['status']} | {p.get('seconds', 0):.1f} | "
                   f"{e.get('type', '')} {e.get('message', '')[:150]} |")
    out += ["", "## Figures", ""] + _figures({k: _get(data, "parts", k, "results") or {} for k in PARTS})
    out += ["", "## Skipped by the time guard", ""] + [f"- {x}" for x in data["skipped"]] if data["skipped"] else []
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------


def run_part(s: Suite, key: str, fn) -> None:
    rec = s.data["parts"][key] = dict(name=PARTS[key], status="running", results={})
    if not s.fits(s.size["est"][key], f"part {key} ({PARTS[key]})"):
        rec["status"] = "skipped"
        s.save()
        return
    s.log(f"part {key} ({PARTS[key]}) ...")
    t = time.monotonic()
    try:
        fn(s, rec["results"])
        rec["status"] = "ok"
    except Exception as e:
        rec.update(status="error", error=_error(e))
        s.log(f"part {key} failed: {type(e).__name__}: {str(e)[:300]}")
    rec["seconds"] = time.monotonic() - t
    _free()
    s.save()
    s.log(f"part {key} {rec['status']} in {rec['seconds']:.1f} s")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for suite.json and summary.md")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--time-budget", type=float, default=450.0, help="seconds; parts that would not fit are skipped")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated letters (default a,b,c,d,e,f)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.parts.split(",") if k.strip()]
    bad = [k for k in keys if k not in PARTS]
    if bad:
        p.error(f"--parts: unknown part {bad[0]!r} (valid: {', '.join(PARTS)})")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            p.error("--dry-run: triton was imported before TRITON_INTERPRET=1 could be set; run the script directly")
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --dry-run for the CPU check")
    device = torch.device("cpu" if args.dry_run else "cuda")
    s = Suite(args, DRY if args.dry_run else GPU, device)
    s.log(f"{s.data['meta']['device']}; torch {torch.__version__}, triton {s.data['meta']['triton']}; {load()}")
    fns = dict(a=part_correctness, b=part_layer, c=part_block, d=part_training, e=part_decode, f=part_tiles)
    for k in keys:
        run_part(s, k, fns[k])
    s.data["meta"]["load_end"] = load()
    s.save()
    s.log(f"done; wrote {s.out / 'suite.json'} and {s.out / 'summary.md'}")
    return s.data


if __name__ == "__main__":
    main()
