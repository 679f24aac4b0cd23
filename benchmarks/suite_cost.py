"""What the test suite costs: wall time and the peak resident memory of its process, with the load around it.

    python benchmarks/suite_cost.py --save                 # the fast suite, as the README's test command runs it
    python benchmarks/suite_cost.py --marker slow --save   # the slow tests

The suite runs in a child process (`python -m pytest -q -m MARKER`); its peak RSS is the child's (getrusage of the
children). The compiled CPU kernels are built on first use into $TORCH_EXTENSIONS_DIR: an empty folder times that
build too, a warm one does not, and the file says which. The load average is recorded because other jobs on the
machine lengthen the wall time, never the result.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import RESULTS, device_name, load, slug  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def extensions_state() -> str:
    d = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not d:
        return "TORCH_EXTENSIONS_DIR unset (torch's default folder)"
    built = Path(d).is_dir() and any(Path(d).iterdir())
    return f"TORCH_EXTENSIONS_DIR {'already held the compiled kernels' if built else 'was empty (build timed)'}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--marker", default="not slow", help="pytest -m expression (default: the fast suite)")
    ap.add_argument("paths", nargs="*", help="test files or folders (default: the whole suite, as configured)")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/suite_cost_<device>_<date>.md")
    args = ap.parse_args(argv)
    kernels, load_start = extensions_state(), load()
    start = time.perf_counter()
    began = datetime.datetime.now(datetime.timezone.utc)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", args.marker, *args.paths], cwd=ROOT,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # KiB on Linux
    summary = next((ln for ln in reversed(res.stdout.splitlines()) if " in " in ln and ("passed" in ln or
                                                                                        "failed" in ln)), "?")
    failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in res.stdout.splitlines() if ln.startswith("FAILED ")]
    out = {"wall_s": round(wall, 1), "peak_rss_gb": round(peak_gb, 2), "summary": summary.strip("= "),
           "failed": failed}
    device = device_name(torch.device("cpu"))
    what = f"-m \"{args.marker}\"" + "".join(f" {p}" for p in args.paths)
    lines = [f"# Test suite cost: `pytest {what}`", "",
             f"- device: {device} ({os.cpu_count()} logical CPUs visible); torch {torch.__version__}",
             f"- date: {began:%Y-%m-%d %H:%M UTC} (start)",
             f"- command: `python benchmarks/suite_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"- {load_start} at start, {load()} at end; {kernels}", "",
             "| suite | wall | peak RSS | pytest's summary |", "|---|---|---|---|",
             f"| {what} | {out['wall_s']:.0f} s | {out['peak_rss_gb']:.2f} GB | {out['summary']} |",
             *([""] + [f"- failed: `{t}`" for t in failed] if failed else [])]
    print("\n".join(lines))
    if args.save:
        path = RESULTS / f"suite_cost_{slug(device)}_{datetime.date.today().isoformat()}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
