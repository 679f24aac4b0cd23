"""Memory the process can still use, and the check every large allocation makes against it first.

A model, a training step or an inference engine that cannot fit should say so in one line with both numbers before
anything is allocated, not die in the allocator minutes later (or be killed by the kernel's OOM killer, which
leaves no message at all). The estimate is the project's own accounting (`memoryformer.footprint`); the limit is
what the kernel reports as available (MemAvailable, and a cgroup's memory.max where one applies) or, on CUDA, the
free device memory. `force=True` (`--force-memory`, or MEMORYFORMER_FORCE_MEMORY=1) skips the check.
"""

from __future__ import annotations

import os
from pathlib import Path

from memoryformer.config import MemoryFormerError

FORCE_ENV = "MEMORYFORMER_FORCE_MEMORY"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), None without a limit."""
    try:
        rel = next(ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
                   if ln.startswith("0::"))
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def available_bytes(device: str = "cpu") -> int | None:
    """Bytes a new allocation on `device` can still get ("cpu" or "cuda[:i]"); None when unknown."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(known) if known else None


def check_fits(need: float, what: str, device: str = "cpu", force: bool = False) -> None:
    """One line naming `what`, its estimate and the memory available when `need` bytes will not fit."""
    if force or os.environ.get(FORCE_ENV, "0") not in ("", "0"):
        return
    have = available_bytes(device)
    if have is not None and need > have:
        where = "GPU memory free" if str(device).startswith("cuda") else "memory available"
        raise MemoryFormerError(f"{what} needs about {need / 1e9:,.2f} GB, more than the {have / 1e9:,.2f} GB of "
                                f"{where}; use a smaller model or batch, or --force-memory to try anyway")
