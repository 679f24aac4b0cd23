"""The compiled CPU decode kernel (`csrc/decode.cpp`): hash + gather for 1-2 tokens in one call.

At batch 1 a Memory Layer reads 1/tau of a dense layer's bytes, but the ATen path spends its time in ~15 small
operations; this kernel does the whole layer in one. It is built with `torch.utils.cpp_extension` the first time
a CPU Memory Layer runs inference on that few tokens (about 30 s, once per machine: the build is cached under
`~/.cache/torch_extensions`, keyed by the source and the CPU's instruction set). Without a C++ compiler, or with
`MEMORYFORMER_CPU_KERNEL=0`, the ATen path runs instead and one log line says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

log = logging.getLogger("memoryformer")

SOURCE = Path(__file__).parent / "csrc" / "decode.cpp"
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
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode()).hexdigest()[:12]
    return f"memoryformer_cpu_decode_{key}"


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
            from torch.utils.cpp_extension import load

            log.info("memoryformer: building the CPU decode kernel (once per machine, cached)")
            # -fopenmp-simd: vectorisation hints only, no second OpenMP runtime beside torch's
            flags = ["-O3", "-fopenmp-simd"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
            module = load(build_name(), [str(SOURCE)], extra_cflags=flags, verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the ATen path
            reason = f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    if module is None:
        log.warning(f"memoryformer: CPU decode kernel unavailable ({reason}); using the ATen path")
    _state["module"] = module
    return module


def reset() -> None:
    """Forget the loaded module (tests)."""
    _state.clear()
