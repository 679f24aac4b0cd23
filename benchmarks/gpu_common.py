"""Run state shared by the GPU suite's parts (benchmarks/gpu_suite.py): the `Suite` (sizes, clock, time guard,
progress log, results written after every candidate) and the helpers every part uses. Imports none of the other
gpu_* modules except the report, so that the parts and the suite import it without a circle."""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import signal
import time
import traceback
from pathlib import Path

import torch
from gpu_report import PARTS, summary, targets
from kernel_timing import time_interleaved

from memoryformer import MemoryLayer
from memoryformer.model import Rotary

# Messages of errors after which the CUDA context is unusable: every later launch fails too, so the rest of the
# suite runs in a fresh process.
CUDA_FATAL = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure",
              "misaligned address", "illegal instruction", "CUBLAS_STATUS_EXECUTION_FAILED", "cudaErrorIllegalAddress",
              "CUDA driver error")


class OutOfTime(BaseException):
    """Raised by the time guard's alarm inside a part: not an Exception, so no candidate's handler swallows it."""


def error(e: BaseException) -> dict:
    return dict(type=type(e).__name__, message=str(e)[:2000], traceback=traceback.format_exc()[-4000:])


def cuda_fatal(e: BaseException) -> bool:
    """Whether `e` leaves the CUDA context poisoned (an illegal address, a device assert, a failed launch)."""
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(e, accel)) or any(m in str(e) for m in CUDA_FATAL)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Suite:
    """Sizes, clock and time guard, progress log, and the results written after every candidate."""

    def __init__(self, args, size: dict, device: torch.device, start: float, data: dict):
        self.args, self.size, self.dev, self.t0 = args, size, device, start
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = data
        self.fatal: BaseException | None = None  # a CUDA error seen inside a part: the context is poisoned
        self.issues = 0  # candidates of the running part that failed or did not fit

    def log(self, msg: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        print(f"[{now} +{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def left(self) -> float:
        return self.args.time_budget - (time.monotonic() - self.t0)

    def fits(self, seconds: float, what: str, part: str) -> bool:
        """Whether `what` (estimated `seconds`) still fits the time budget; if not, record and say so."""
        left = self.left()
        if seconds <= left:
            return True
        self.issues += 1
        self.data["skipped"].append(dict(part=part, what=what, need_s=round(seconds), left_s=round(max(left, 0))))
        self.log(f"skip {what}: needs ~{seconds:.0f} s, {max(left, 0):.0f} s left")
        return False

    def time(self, fns: dict, budget: float | None = None) -> dict[str, float]:
        warmup, reps, default = self.size["timing"]
        return time_interleaved(fns, self.dev, warmup=warmup, reps=reps, budget_s=budget or default)

    def attempt(self, store: dict, fn) -> bool:
        """store.update(fn()) for one candidate; an exception is recorded in store["error"] and the part goes on
        (a CUDA error is remembered: the part then stops and the suite continues in a fresh process)."""
        try:
            store.update(fn())
            return True
        except Exception as e:
            store["error"] = error(e)
            self.issues += 1
            self.log(f"  failed: {type(e).__name__}: {str(e)[:300]}")
            if cuda_fatal(e):
                self.fatal = e
            free()
            return False

    def poisoned(self) -> bool:
        return self.fatal is not None

    @contextlib.contextmanager
    def alarm(self):
        """The guard inside parts: OutOfTime is raised wherever the run is when the budget runs out."""
        def ring(signum, frame):
            raise OutOfTime(f"time budget of {self.args.time_budget:.0f} s spent")

        old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.data.get("previous_elapsed_s", 0) + time.monotonic() - self.t0, 1)
        self.write()

    def write(self) -> None:
        self.data["parts"] = {k: self.data["parts"][k] for k in PARTS if k in self.data["parts"]}
        self.data["targets"] = targets(self.data)
        tmp = self.out / "suite.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.out / "suite.json")  # a kill mid-write leaves the previous complete file
        try:
            text = summary(self.data)
        except Exception as e:  # the JSON holds every figure; a summary bug must not stop the suite
            text = f"# summary failed\n\n```\n{error(e)['traceback']}\n```\n"
        (self.out / "summary.md").write_text(text)


# ---------------------------------------------------------------------------------------------------------------
# Shared by several parts


def grads(fn, a: torch.Tensor, b: torch.Tensor, gy: torch.Tensor):
    """(y, dL/da, dL/db) of L = <gy, fn(a, b)>."""
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    y = fn(a, b)
    return (y.detach(), *torch.autograd.grad(y, [a, b], gy.to(y.dtype)))


def use_triton(model: torch.nn.Module) -> list[str]:
    """Every Memory Layer on the Triton backend (what "auto" picks on CUDA; explicit for the interpreter on CPU)."""
    layers = [m for m in model.modules() if isinstance(m, MemoryLayer)]
    for m in layers:
        m.backend = "triton"
    return sorted({m.active_backend() for m in layers})


def step(module, x: torch.Tensor, mode: str, autocast: bool = False):
    """A closure running one forward (no grad) or forward + backward (grads of x and every parameter)."""
    params = [p for p in module.parameters() if p.requires_grad]
    xg, gy = x.detach().requires_grad_(mode != "fwd"), torch.randn_like(x)

    def run():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.set_grad_enabled(mode != "fwd"):
                y = module(xg)
        if mode != "fwd":
            torch.autograd.grad(y, [xg, *params], gy, allow_unused=True)
    return run


def block(cfg, cls, dev, table_dtype=None):
    """One transformer block of `cls` for `cfg`, built on `dev`, its Memory Layers on the Triton backend."""
    with dev:  # parameters are created and initialised on the device
        blk = cls(cfg, Rotary(cfg.rotary_dims, cfg.max_seq_len, cfg.rotary_base))
    use_triton(blk)
    for m in blk.modules():
        if isinstance(m, MemoryLayer) and table_dtype is not None:
            m.tables.data = m.tables.data.to(table_dtype)  # autocast leaves lookups alone: bf16 rows, half the bytes
    return blk
