"""`memoryformer doctor`: the environment in one screen, for a bug report or a first look at a new machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
PACKAGES = ("memoryformer", "torch", "triton", "numpy", "tokenizers", "safetensors", "transformers", "lm_eval",
            "fastapi", "uvicorn")


def add_doctor(p) -> None:
    p.add_argument("--build", action="store_true", help="also build the CPU kernels now if they are not built")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [f for f in CPU_FEATURES if f in flags]


def _kernels(build: bool) -> str:
    from memoryformer.ops import cpu_ext

    reason = cpu_ext.why_not()
    if reason:
        return f"off ({reason})"
    from memoryformer.ops.build import build_dir, is_built

    name = cpu_ext.build_name()
    where, built = build_dir(name), is_built(name)
    if not built and build:
        built = cpu_ext.get() is not None
    return f"{'built' if built else 'not built yet (built on first use, ~1-3 min)'} in {where}"


def _gpu() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["CUDA: not available (the CPU backends run)"]
    lines = [f"CUDA: {torch.version.cuda}, {torch.cuda.device_count()} device(s)"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}")
    try:
        from memoryformer.ops import triton_backend
    except ImportError as e:
        return [*lines, f"Triton: unavailable ({e}); layers use F.embedding_bag"]
    for dtype in (torch.float32, torch.bfloat16):
        try:
            why = triton_backend.self_check("cuda:0", dtype, warn=False)
        except Exception as e:  # noqa: BLE001 - a compile error is a verdict too
            why = f"{type(e).__name__}: {e}"
        verdict = "agrees with F.embedding_bag" if why is None else f"NOT trusted ({why}); F.embedding_bag runs"
        lines.append(f"Triton self-check, {str(dtype).removeprefix('torch.')} tables on cuda:0: {verdict}")
    return lines


def run_doctor(args) -> None:
    import torch

    from memoryformer.resources import available_bytes

    model, feats = _cpu()
    mem = available_bytes("cpu")
    rows = [f"python {sys.version.split()[0]} on {platform.platform()}",
            *(f"{name} {_version(name)}" for name in PACKAGES),
            f"CPU: {model}, {os.cpu_count()} logical cores, features {' '.join(feats) or 'none of ' + ', '.join(CPU_FEATURES)}",
            f"torch threads: {torch.get_num_threads()}; {torch.__config__.parallel_info().splitlines()[-1].strip()}",
            f"memory available: {mem / 1e9:,.1f} GB" if mem is not None else "memory available: unknown",
            f"CPU kernels: {_kernels(args.build)}",
            *_gpu()]
    print("\n".join(rows))
