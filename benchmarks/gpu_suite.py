"""The whole GPU check in one command: Triton kernels at every model shape, one layer, one block, training, tiles,
decoding. The two commands for a first, short loan (docs/GPU.md):

    PYTHONPATH=src python benchmarks/gpu_suite.py --out "$OUT/gpu" --time-budget 340            # timeout_s=390
    PYTHONPATH=src python benchmarks/gpu_suite.py --out "$OUT/gpu" --parts <left> --merge run1/suite.json \\
        --time-budget 220                                                                      # timeout_s=260
    PYTHONPATH=src python benchmarks/gpu_suite.py --out /tmp/gpu --dry-run   # CPU, Triton interpreter: ~2 min

Parts (letters for --parts), in the order they run (value per second of device time):
  a  correctness: fused Triton layer (output, input and table gradients) and lookup op (output, weight and table
     gradients; atomic table gradient too) against the float64 reference and F.embedding_bag at every Memory Layer
     shape of the tiny / small / base presets, fp32 and bf16 tables, N = 16384, outputs poisoned with NaN;
     torch.library.opcheck of the ops, one test utility at a time; torch.compile(fullgraph=True) of a block.
  b  one layer (d = 1024, tau = 8, N = 16384, bf16) against F.linear; row bytes/s of the forward.
  c  one block (B = 8, T = 2048, bf16 autocast, bf16 tables) against the Pythia block, d = 512 / 768 / 1024.
  d  training tokens/s and peak memory, 30 fused-AdamW steps: MF-tiny vs pythia-70m, MF-small vs pythia-160m.
  e  tile sweep of the forward, grad-weights and table-gradient kernels; the fastest go to `best_tiles`.
  f  batch-1 greedy decode tokens/s: MF-tiny and the repo's dense Pythia-70M through the same generate(), then
     Hugging Face GPTNeoX (static cache, eager and compiled with CUDA graphs) shown apart.

Writes DIR/suite.json (every figure, rewritten after each candidate, so a killed run keeps what it measured) and
DIR/summary.md (device, versions, targets, parts, figures, what to run again). Every part and every candidate in
it is guarded: an error is recorded (type, message, traceback tail) and the next one runs. After a CUDA error
(illegal address, device assert: the context is poisoned) the remaining parts run in a fresh process, which
merges its results into the same files. The time guard skips what its estimate says would not fit, and an alarm
stops the run where it is when --time-budget is spent. `--merge FILE` starts from an earlier suite.json (its
parts are kept unless run again). `--dry-run` runs the same code at tiny shapes on CPU under TRITON_INTERPRET=1
(tests/test_gpu_suite.py). Weights and token ids are random: speed does not depend on them; nothing is downloaded.
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
os.environ["HF_HUB_OFFLINE"] = "1"  # random weights only: never reach for the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other gpu_* modules and kernel_timing
from gpu_common import OutOfTime, Suite, cuda_fatal, error, free  # noqa: E402
from gpu_correctness import part_correctness  # noqa: E402
from gpu_parts import PAIRS, part_block, part_decode, part_layer, part_tiles, part_training  # noqa: E402
from gpu_report import PARTS  # noqa: E402
from kernel_timing import device_name, load  # noqa: E402

# benchmarks/kernels.py would shadow the `kernels` package transformers imports: once ours are loaded, this folder
# leaves the path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

# Seconds per candidate: estimates, not measurements on this machine. They scale the H100 timings in the project's
# GPU notes (forward gather 0.5 ms, whole-layer fwd+bwd ~30x F.linear at d = 1024, MF block fwd+bwd ~0.1 s with
# embedding_bag) and add Triton's compile of each new kernel specialisation (~1 s each, several per new (K, tau,
# dtype)); HF's torch.compile + CUDA graphs took 60-130 s on an H100.
EST = dict(self_check=3, case=5, opcheck=20, compile=45, layer=5, block=12, train=15, tile=3, memoryformer=20, dense_pythia=10,
           hf_static_eager=15, hf_static_compiled=130)
FIRST = dict(a="case", b="layer", c="block", d="train", e="tile", f="memoryformer")  # a part needs its first to fit
GPU = dict(
    presets=("tiny", "small", "base"), n=16384, ref_elems=2**27, tau=8, compile=(2, 512, "inductor"),
    layer=(1024, 16384), blocks=PAIRS, batch=(8, 2048), train=PAIRS[:2], steps=(3, 30), decode=(32, 128, 2, 3),
    over={}, timing=(3, 20, 10.0),
    tiles=dict(fwd=[(16, 64), (64, 64), (16, 128), (32, 128)], bwd=[(16, 128), (32, 64), (64, 64)],
               seg=[(8, 128), (32, 128), (16, 64)]),
    est=EST,
)
DRY = dict(  # the interpreter runs every Triton program in Python: few programs, i.e. small K * 2**tau and N
    presets=("tiny", "small", "base"), n=32, ref_elems=2**20, tau=2, compile=(1, 16, "eager"), layer=(8, 32),
    blocks=PAIRS[:1], batch=(1, 32), train=PAIRS[:1], steps=(1, 1), decode=(4, 2, 0, 1), timing=(1, 1, 1.0),
    over=dict(n_layer=1, d_model=8, n_head=1, max_seq_len=64, tau=2, vocab_size=256),
    tiles=dict(fwd=[(16, 64)], bwd=[(16, 64)], seg=[(8, 64)]),
    est={k: 1 for k in EST},
)
FNS = dict(a=part_correctness, b=part_layer, c=part_block, d=part_training, e=part_tiles, f=part_decode)


def _meta(args, device) -> dict:
    versions = {}
    for mod in ("triton", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # the suite still runs the parts that do not need it
            versions[mod] = f"not importable ({type(e).__name__})"
    meta = dict(device=device_name(device), torch=torch.__version__, python=sys.version.split()[0],
                cuda=torch.version.cuda, **versions,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join(sys.argv), dry_run=args.dry_run, time_budget_s=args.time_budget,
                load_start=load(), triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    if device.type == "cuda":
        meta["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return meta


def _data(args, device, keys: list[str]) -> dict:
    meta = _meta(args, device)
    if not args.merge:
        return dict(meta=meta, runs=[meta], parts={}, skipped=[], restarts=[], targets=[], best_tiles={})
    data = json.loads(Path(args.merge).read_text())
    data.setdefault("runs", []).append(meta)
    data.setdefault("restarts", [])
    for k in keys:  # parts run again replace what the earlier file holds
        data["parts"].pop(k, None)
    data["skipped"] = [x for x in data.get("skipped", []) if x.get("part") not in keys]
    data["previous_elapsed_s"] = data.get("elapsed_s", 0)
    return data


def _sync(s: Suite) -> None:
    """Wait for the device: an asynchronous kernel error surfaces here, charged to the part that caused it."""
    if s.dev.type == "cuda":
        torch.cuda.synchronize(s.dev)


def run_part(s: Suite, key: str) -> str:
    rec = s.data["parts"][key] = dict(name=PARTS[key], status="running", results={})
    s.issues = 0
    if not s.fits(s.size["est"][FIRST[key]], f"part {key} ({PARTS[key]})", key):
        rec["status"] = "skipped"
        s.save()
        return rec["status"]
    s.log(f"part {key} ({PARTS[key]}) ...")
    t = time.monotonic()
    try:
        FNS[key](s, rec["results"])
        _sync(s)
        rec["status"] = "partial" if s.issues else "ok"
    except OutOfTime as e:
        rec.update(status="stopped", error=error(e))
    except Exception as e:
        rec.update(status="error", error=error(e))
        if cuda_fatal(e):
            s.fatal = e
    rec["seconds"] = time.monotonic() - t
    if s.poisoned():
        rec["cuda_error"] = f"{type(s.fatal).__name__}: {str(s.fatal)[:500]}"
    else:
        free()
    s.save()
    s.log(f"part {key} {rec['status']} in {rec['seconds']:.1f} s"
          + (f": {rec['error']['type']}: {rec['error']['message'][:300]}" if "error" in rec else ""))
    return rec["status"]


def _restart(s: Suite, after: str, rest: list[str]) -> dict:
    """The CUDA context is poisoned: replace this process (freeing its context and memory) by a fresh one that
    runs the remaining parts and merges them into the same files."""
    left = s.left()
    s.data["restarts"].append(dict(after=after, parts=rest, reason=f"{type(s.fatal).__name__}: {str(s.fatal)[:300]}"))
    if left < 10:
        for k in rest:
            s.data["skipped"].append(dict(part=k, what=f"part {k} ({PARTS[k]}) after a CUDA error", need_s=10,
                                          left_s=round(max(left, 0))))
        s.save()
        return s.data
    s.save()
    cmd = [sys.executable, os.path.abspath(__file__), "--out", str(s.out), "--parts", ",".join(rest),
           "--merge", str(s.out / "suite.json"), "--time-budget", f"{left:.0f}"] + ["--dry-run"] * s.args.dry_run
    s.log(f"CUDA error in part {after}: parts {','.join(rest)} continue in a fresh process")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return s.data  # not reached


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for suite.json and summary.md")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--time-budget", type=float, default=340.0,
                   help="seconds from the start; what would not fit is skipped, and the run stops when it is spent")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated letters (default a,b,c,d,e,f)")
    p.add_argument("--merge", default=None, help="an earlier suite.json to start from (its other parts are kept)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.parts.split(",") if k.strip()]
    bad = [k for k in keys if k not in PARTS]
    if bad:
        p.error(f"--parts: unknown part {bad[0]!r} (valid: {', '.join(PARTS)})")
    keys = [k for k in PARTS if k in keys]  # always in the suite's order
    if args.merge and not Path(args.merge).is_file():
        p.error(f"--merge: no such file {args.merge!r} (expected an earlier run's suite.json)")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            p.error("--dry-run: triton was imported before TRITON_INTERPRET=1 could be set; run the script directly")
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --dry-run for the CPU check")
    device = torch.device("cpu" if args.dry_run else "cuda")
    s = Suite(args, DRY if args.dry_run else GPU, device, START, _data(args, device, keys))
    m = s.data["runs"][-1]
    s.log(f"{m['device']}; torch {torch.__version__}, triton {m['triton']}; {m['load_start']}; parts {','.join(keys)}")
    poisoned_at = None
    with s.alarm():
        for i, k in enumerate(keys):
            try:
                status = run_part(s, k)
            except OutOfTime:  # rang between a part's own guard and its bookkeeping
                status = "stopped"
            if s.poisoned():
                poisoned_at = i
                break
            if status == "stopped":
                for rest in keys[i + 1:]:
                    s.data["parts"][rest] = dict(name=PARTS[rest], status="skipped", results={})
                    s.data["skipped"].append(dict(part=rest, what=f"part {rest} ({PARTS[rest]})", need_s=0, left_s=0))
                break
    if poisoned_at is not None and keys[poisoned_at + 1:]:  # the alarm is off: the child keeps its own
        return _restart(s, keys[poisoned_at], keys[poisoned_at + 1:])
    s.data["runs"][-1]["load_end"] = load()
    s.save()
    s.log(f"done; wrote {s.out / 'suite.json'} and {s.out / 'summary.md'}")
    return s.data


if __name__ == "__main__":
    main()
