"""Timing helpers shared by the kernel and block benchmarks: device naming, load, interleaved medians."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def header(title: str, device: torch.device, argv: list[str]) -> list[str]:
    import importlib.util

    tri = "n/a"
    if importlib.util.find_spec("triton") is not None:
        import triton

        tri = triton.__version__
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"# {title}",
        "",
        f"- device: **{device_name(device)}** ({os.cpu_count()} logical CPUs visible)",
        f"- date: {now}; torch {torch.__version__}, triton {tri}",
        f"- command: `python {' '.join(argv)}`",
        f"- {load()} at start",
        "",
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, callable], device: torch.device, *, warmup: int = 3, reps: int = 20,
                     budget_s: float = 20.0) -> dict[str, float]:
    """Median seconds per call of each fn, run in alternating rounds (A B A B ...) so that background load and
    clock drift hit every candidate alike. Stops early once `budget_s` is spent (at least 3 rounds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def triton_hash_fusion(enabled: bool):
    """Run the Triton backend with (default) or without the hash fused into its gather kernel."""
    if enabled:
        yield
        return
    from memoryformer.ops import triton_backend

    triton_backend.register(fuse_hash=False)
    try:
        yield
    finally:
        triton_backend.register()


def fmt_time(s: float) -> str:
    if s != s:  # nan: not measured
        return "n/a"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"
