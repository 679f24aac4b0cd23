"""Soak: a long micro run with frequent checkpoints, watching resident memory and the run folder's disk use.

A 2000-step run of a 1-layer, 32-wide MemoryFormer (batch 2 x 32 tokens) checkpoints every 20 steps and keeps the
newest 3. Resident memory (VmRSS from /proc/self/status) is sampled every few steps, and the run folder's size both
then and, from a background thread, every 50 ms (to catch the peak while a checkpoint is written beside the ones
kept). It passes when RSS after the warm-up (the first 10 % of steps) grows less than 5 % and the folder never holds
more than the kept checkpoints, one being written, final/ and the logs. It measures memory, not time: run it at any
load (`nice -n 10 python benchmarks/soak.py --save`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

import torch  # noqa: E402
from kernel_timing import RESULTS, device_name, load, slug  # noqa: E402

import memoryformer as mf  # noqa: E402
from memoryformer.train import TrainConfig, loop, train  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:  # removed while we walked (pruning, a rename)
                pass
    return total


class Watcher:
    """Samples of (step, rss, disk) after every `every`-th step, and the folder's peak size from a thread."""

    def __init__(self, out: Path, every: int):
        self.out, self.every, self.samples, self.peak_disk = out, every, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(0.05):
            self.peak_disk = max(self.peak_disk, folder_bytes(self.out))

    def step_done(self, step: int) -> None:
        if step % self.every == 0:
            self.samples.append((step, rss_bytes(), folder_bytes(self.out)))

    def __enter__(self):
        real = loop.train_step

        def counted(run):
            result = real(run)
            self.step_done(run.step + 1)
            return result

        loop.train_step, self._real = counted, real
        self._thread.start()
        return self

    def __exit__(self, *exc):
        loop.train_step = self._real
        self._stop.set()
        self._thread.join()


def soak(args) -> dict:
    out = Path(args.out or tempfile.mkdtemp(prefix="memoryformer-soak-")) / "run"
    cfg = mf.get_config("micro", n_layer=1, d_model=32, n_head=2, max_seq_len=32)
    t = TrainConfig(data=args.data, out=str(out), batch_size=2, seq_len=32, max_steps=args.steps, eval_every=0,
                    eval_tokens=256, log_every=10, ckpt_every=args.ckpt_every, keep_checkpoints=args.keep,
                    progress=False, verbose=False, device="cpu")
    t0 = time.perf_counter()
    with Watcher(out, args.sample_every) as w:
        summary = train(cfg, t)
    seconds = time.perf_counter() - t0
    done = sorted((p for p in out.iterdir() if p.is_dir() and p.name.startswith("ckpt-")),
                  key=lambda p: int(p.name.split("-")[1]))
    ckpt_size = folder_bytes(out / "final") if (out / "final").is_dir() else folder_bytes(done[-1]) if done else 0
    warm = [s for s in w.samples if s[0] >= args.steps // 10]
    # RSS saws up and down by a checkpoint's buffers (~40 MB here) as they are allocated and freed, so growth compares
    # the highest sample of the last quarter of the run after warm-up with the highest of its first quarter
    q = max(1, len(warm) // 4)
    base_rss, late_rss = max(s[1] for s in warm[:q]), max(s[1] for s in warm[-q:])
    growth = late_rss / base_rss - 1
    logs = sum(os.stat(out / n).st_size for n in ("metrics.jsonl", "train_config.json", "config.json"))
    bound = (args.keep + 2) * ckpt_size + logs  # kept ones + the one being written (or final/) + logs
    left = sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock")
    kept, disk_final = sorted(p.name for p in out.iterdir() if p.is_dir()), folder_bytes(out)
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    return dict(
        steps=summary["steps"], steps_asked=args.steps, keep=args.keep, complete=summary["steps"] >= args.steps,
        seconds=round(seconds, 1), sample_every=args.sample_every,
        checkpoints_written=summary["steps"] // args.ckpt_every, ckpt_every=args.ckpt_every,
        checkpoint_mb=round(ckpt_size / 1e6, 2), kept=kept,
        leftover_temporaries=left, warm_step=warm[0][0], rss_warm_mb=round(base_rss / 1e6, 1),
        rss_late_mb=round(late_rss / 1e6, 1),
        rss_max_mb=round(max(s[1] for s in warm) / 1e6, 1), rss_final_mb=round(w.samples[-1][1] / 1e6, 1),
        rss_growth_pct=round(100 * growth, 2), disk_peak_mb=round(w.peak_disk / 1e6, 1),
        disk_final_mb=round(disk_final / 1e6, 1), disk_bound_mb=round(bound / 1e6, 1),
        rss_ok=growth < 0.05, disk_ok=w.peak_disk <= bound and not left,
        samples=[dict(step=s, rss_mb=round(r / 1e6, 2), disk_mb=round(d / 1e6, 2)) for s, r, d in w.samples],
    )


def report(res: dict, argv: list[str], load_start: str, load_end: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    every = max(1, len(res["samples"]) // 10)
    rows = "\n".join(f"| {s['step']} | {s['rss_mb']:.1f} | {s['disk_mb']:.1f} |" for s in res["samples"][::every])
    verdict = lambda ok: "**pass**" if ok else "**FAIL**"  # noqa: E731
    return f"""# Soak: memory and disk over a long run with frequent checkpoints

- device: **{device_name(torch.device('cpu'))}** ({os.cpu_count()} logical CPUs visible)
- date: {now}; torch {torch.__version__}
- command: `nice -n 10 python benchmarks/soak.py {' '.join(argv)}`
- {load_start} at start, {load_end} at end (memory is measured, not time)

The micro preset cut to 1 layer x 32 wide (vocab 50 304: the embedding and the head are most of its 3.5 M
parameters), batch 2 x 32 tokens, on the bundled sample.

- {res['steps']} of {res['steps_asked']} steps in {res['seconds']} s{'' if res['complete'] else ' (**the run was stopped early: not a result**)'}; \
a checkpoint every {res['ckpt_every']} steps ({res['checkpoints_written']} written, {res['checkpoint_mb']} MB each with \
the optimizer state), the newest {res['keep']} kept
- folders at the end: {', '.join(res['kept'])}; temporaries left behind: {', '.join(res['leftover_temporaries']) or 'none'}

| | value | criterion | |
|---|---|---|---|
| resident memory after warm-up (from step {res['warm_step']}): highest in its first / last quarter | {res['rss_warm_mb']} / {res['rss_late_mb']} MB | | |
| resident memory, max after warm-up / final | {res['rss_max_mb']} / {res['rss_final_mb']} MB | | |
| growth after warm-up (last quarter's peak over the first quarter's) | {res['rss_growth_pct']} % | < 5 % | {verdict(res['rss_ok'])} |
| run folder, peak (50 ms polling) / final | {res['disk_peak_mb']} / {res['disk_final_mb']} MB | <= {res['disk_bound_mb']} MB | {verdict(res['disk_ok'])} |

The disk bound is the kept checkpoints, the one being written (or final/) and the logs; RSS samples every
{res['sample_every']} steps, one in {every} shown.

| step | RSS (MB) | run folder (MB) |
|---|---|---|
{rows}
"""


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--ckpt-every", type=int, default=20)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--sample-every", type=int, default=10, help="steps between RSS samples (default 10)")
    ap.add_argument("--data", default=None, help="training text (default: the bundled sample)")
    ap.add_argument("--out", help="parent of the run folder (default: a new temporary folder)")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/soak_<device>_<date>.{md,json}")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_start = load()
    res = soak(args)
    text = report(res, argv, load_start, load())
    print(text)
    if args.save:
        stem = RESULTS / f"soak_{slug(device_name(torch.device('cpu')))}_{datetime.date.today().isoformat()}"
        stem.with_suffix(".md").write_text(text, encoding="utf-8")
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    if not (res["rss_ok"] and res["disk_ok"]):
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
