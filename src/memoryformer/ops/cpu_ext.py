"""The compiled CPU inference kernels (`csrc/`): the Memory Layer for 1-2 tokens, the quantised LM head's GEMV and
the whole-model decode engine (`memoryformer.inference.DecodeEngine`).

At batch 1 a Memory Layer reads 1/tau of a dense layer's bytes, but as K scattered rows: the ATen path spends its
time in ~15 small operations and the rows arrive one DRAM latency at a time. The kernel does the whole layer in one
call, prefetches the rows it is about to read and splits the output columns over a small pool of persistent
threads (`threads()`), or over torch's intra-op threads with `parallel("aten")` (benchmarks/pool.py compares them).

It is built with `torch.utils.cpp_extension` the first time it is needed (about a minute, once per machine and
checkout: the build is cached under `~/.cache/torch_extensions`, keyed by the sources, the CPU's instruction set and
the checkout's path; `ops/build.py` keeps a build from hanging or running silently). Without a
C++ compiler, or with `MEMORYFORMER_CPU_KERNEL=0`, the ATen path runs instead and one log line says why.
"""

from __future__ import annotations

import contextlib

import logging
import os
import platform
import shutil
import sys
from pathlib import Path

from memoryformer.ops import build

log = logging.getLogger("memoryformer")

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "decode.cpp", CSRC / "engine.cpp")
HEADERS = tuple(sorted(CSRC.glob("*.h")))
MAX_TOKENS = 2  # above this, fbgemm's embedding bag is as fast (benchmarks/results/kernels_summary.md)

_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_name() -> str:
    return build.extension_name("memoryformer_cpu", SOURCES + HEADERS, _cpu_flags())


def why_not() -> str | None:
    if os.environ.get("MEMORYFORMER_CPU_KERNEL", "1") == "0":
        return "MEMORYFORMER_CPU_KERNEL=0"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found"
    return None


def get():
    """The compiled module, building it on first use; None when unavailable (logged once)."""
    if "module" in _state:
        return _state["module"]
    reason = why_not()
    module = None
    if reason is None:
        try:
            cflags, ldflags = _build_flags()
            module = build.load(build_name(), [str(s) for s in SOURCES], cflags, [str(CSRC)], ldflags)
        except build.BuildError as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - any other failure to load means: use the ATen path
            reason = f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    if module is None:
        log.warning(f"memoryformer: CPU inference kernels unavailable ({reason}); using the ATen path")
    _state["module"] = module
    return module


def _build_flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags. at::parallel_for is a template whose OpenMP pragma is compiled into the caller: with
    torch built on OpenMP the extension needs -fopenmp for it to run in parallel at all. On Linux the extension then
    needs libgomp.so.1, the soname of the libgomp torch ships and has already loaded, so the process keeps one OpenMP
    runtime."""
    import torch

    cflags = ["-O3", "-fopenmp-simd"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        return cflags + ["-fopenmp"], ["-fopenmp"]
    return cflags, []


def threads(n: int | None = None) -> int:
    """Threads the compiled kernels use: with the "pool" implementation (the default) the caller plus persistent
    workers, set with `n` (default: torch's count at the first use); with "aten", torch's intra-op threads
    (`torch.set_num_threads`), which `n` leaves alone."""
    module = get()
    if module is None:
        return 1
    if n is not None:
        module.set_threads(int(n))
    return module.get_threads()


def parallel(name: str | None = None) -> str:
    """Which threads run the kernels' parallel loops: "pool" (their own) or "aten" (torch's intra-op pool, sized by
    `torch.set_num_threads`); set with `name`."""
    module = get()
    if module is None:
        return "none"
    if name is not None:
        module.set_parallel(name)
    return module.get_parallel()


def spin_us(us: int | None = None) -> int:
    """Microseconds an idle worker of the pool spins before it sleeps (default 2000: a decode loop's next step
    finds it awake); set with `us`. A server sets it short, so that its HTTP and scheduler threads get the cores
    between two steps."""
    module = get()
    if module is None:
        return 0
    if us is not None:
        module.set_spin_us(int(us))
    return module.get_spin_us()


@contextlib.contextmanager
def torch_serial():
    """torch ops of this thread on one thread inside the block, while the kernels run on their own pool: what runs
    between two engine calls (argmax or sampling over the vocabulary) is too small to split, and torch's OpenMP
    workers spin after each parallel region, taking the pool's cores (MF-small int8, batch 8, greedy: 472 tok/s
    with torch's 2 threads against 721 with 1). The setting is per thread; nothing changes with "aten"."""
    import torch

    n = torch.get_num_threads()
    if n == 1 or parallel() != "pool":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reset() -> None:
    """Forget the loaded module (tests)."""
    _state.clear()
