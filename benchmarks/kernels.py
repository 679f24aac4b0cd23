"""One Memory Layer against `nn.Linear` of the same shape, measured in the same run, plus batch-1 CPU latency.

    python benchmarks/kernels.py                        # CUDA if present (bf16), else CPU (fp32)
    python benchmarks/kernels.py --device cpu --threads 2 --tokens 1 16 2048 --section layer latency --save

Sections:
  layer    MemoryLayer(d, d, tau=8) vs nn.Linear(d, d): d in --dims, tokens in --tokens, forward (no grad, inference)
           and forward+backward (grads of input, tables, bias). Backends: "triton" (hash fused into the gather),
           "triton-unfused" (PyTorch chunk_hash + the Triton lookup), "embedding_bag", "cpu", "reference".
           Ratio = Memory Layer time / Linear time (< 1: ours
           is faster). "rows GB/s" = bytes of table rows the forward gathers (N*K*d*elem) per second.
  latency  CPU inference, d=1024, no grad, 1..16 tokens (decode) and 2048 (prefill): nn.Linear (fp32) vs MemoryLayer
           with the embedding_bag baseline and the cpu backend with fp32 / bf16 / int8 tables.
           "hot" calls one layer again and again (its weights stay in cache); "cold" cycles through a pool of layers
           holding > 1 GB, as in a model whose other layers evict each one's weights between uses. "GB/s" = bytes of
           table rows (+ int8 row scales) one call reads / its time.
           Then the compiled gather alone (`cpu_ext` decode kernel, 1 token) on MF-small's Q/K/V and Block-L2 table
           shapes over a cold pool > LLC: software prefetch on/off, 1/2 threads, tables on huge pages or not.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_timing import (  # noqa: E402
    RESULTS, device_name, fmt_time, header, load, slug, time_interleaved, triton_hash_fusion,
)

from memoryformer import MemoryLayer  # noqa: E402

TAU = 8


def _layer_fn(module: nn.Module, x: torch.Tensor, mode: str, fuse_hash: bool = True):
    """A closure running one forward (no grad) or forward+backward; `fuse_hash=False` times the Triton lookup
    kernels behind a PyTorch chunk_hash instead of the fused hash+gather kernel."""

    def call(inp):
        with triton_hash_fusion(fuse_hash):
            return module(inp)

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                call(x)
        return fwd

    xg = x.detach().requires_grad_()

    def fwd_bwd():
        for p in module.parameters():
            p.grad = None
        call(xg).float().sum().backward()
    return fwd_bwd


def bench_layers(args, device, dtype) -> list[str]:
    backends = args.backends or (
        ["triton", "triton-unfused", "embedding_bag"] if device.type == "cuda" else ["cpu", "embedding_bag"]
    )
    cols = " | ".join(backends)
    lines = [
        f"## Layer: MemoryLayer(d, d, tau={TAU}) vs nn.Linear(d, d), {str(dtype).removeprefix('torch.')} parameters",
        "",
        f"| d | tokens | pass | nn.Linear | {cols} | best / Linear | rows GB/s (best) |",
        "|---|---|---|---|" + "---|" * len(backends) + "---|---|",
    ]
    print("\n".join(lines), flush=True)
    for d in args.dims:
        for n in args.tokens:
            torch.manual_seed(0)
            x = torch.randn(n, d, device=device, dtype=dtype)
            lin = nn.Linear(d, d, device=device, dtype=dtype)
            mems = {b: MemoryLayer(d, d, TAU, backend=b.removesuffix("-unfused"), device=device, dtype=dtype)
                    for b in backends}
            for mode in args.modes:
                fns = {"linear": _layer_fn(lin, x, mode)}
                for b, m in mems.items():
                    fns[b] = _layer_fn(m, x, mode, fuse_hash=not b.endswith("-unfused"))
                times = {}
                for b, m in mems.items():  # an explicit backend that would fall back to another is not measured
                    with torch.set_grad_enabled(mode != "fwd"):
                        ran = m.active_backend()
                    if ran != b.removesuffix("-unfused"):
                        times[b] = float("nan")
                        print(f"  ({b} {mode} d={d} n={n}: not available here, would run {ran!r})", file=sys.stderr)
                for name, fn in fns.items():  # drop candidates that cannot run here (e.g. missing bf16 backward)
                    if name in times:
                        continue
                    try:
                        fn()
                    except (RuntimeError, NotImplementedError) as e:
                        times[name] = float("nan")
                        print(f"  ({name} {mode} d={d} n={n}: {type(e).__name__}: {str(e)[:80]})", file=sys.stderr)
                ok = {k: v for k, v in fns.items() if k not in times}
                times.update(time_interleaved(ok, device, reps=args.reps, budget_s=args.budget))
                best = min((times[b] for b in backends if not math.isnan(times[b])), default=float("nan"))
                rows = n * (d // TAU) * d * torch.finfo(dtype).bits / 8
                gbs = rows / best / 1e9 if mode == "fwd" and best == best else float("nan")
                line = (
                    f"| {d} | {n} | {'fwd' if mode == 'fwd' else 'fwd+bwd'} | {fmt_time(times['linear'])} | "
                    + " | ".join(fmt_time(times[b]) for b in backends)
                    + f" | {best / times['linear']:.2f}x | {gbs:.0f} |"
                )
                print(line, flush=True)
                lines.append(line)
            del mems, lin
            gc.collect()
    return lines + [""]


def _pool(make, pool_bytes: int, per_layer_bytes: int) -> list[nn.Module]:
    return [make() for _ in range(max(1, math.ceil(pool_bytes / per_layer_bytes)))]


def bench_latency(args) -> list[str]:
    d, device = args.latency_dim, torch.device("cpu")
    lines = [
        f"## CPU inference latency, d={d}, no grad: nn.Linear vs MemoryLayer(d, d, tau={TAU})",
        "",
        "MemoryLayer columns: backend and table dtype. `cpu` = fused hash + fbgemm embedding-bag (int8: fbgemm's 8-bit",
        "row-wise kernel); `embedding_bag` = chunk_hash + `F.embedding_bag`, the baseline lookup.",
        "",
        "| tokens | cache | nn.Linear fp32 | embedding_bag fp32 | cpu fp32 | cpu bf16 | cpu int8 "
        "| Linear / cpu (fp32, bf16, int8) | embedding_bag / cpu (fp32, bf16, int8) | cpu GB/s (fp32, bf16, int8) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def mem(backend, dtype):
        m = MemoryLayer(d, d, TAU, backend=backend)
        return m if dtype == "float32" else m.freeze(dtype)

    kinds = {
        "linear": lambda: nn.Linear(d, d),
        "ebag": lambda: mem("embedding_bag", "float32"),
        "fp32": lambda: mem("cpu", "float32"),
        "bf16": lambda: mem("cpu", "bfloat16"),
        "int8": lambda: mem("cpu", "int8"),
    }
    rows = (d // TAU) * 2**TAU
    sizes = {"linear": d * d * 4, "ebag": rows * d * 4, "fp32": rows * d * 4, "bf16": rows * d * 2,
             "int8": rows * (2 * d + 8)}  # int8 keeps its tables + the packed copy the kernel reads
    for cache in args.cache:
        pools = {k: [make()] if cache == "hot" else _pool(make, args.cold_mb << 20, sizes[k]) for k, make in kinds.items()}
        for n in args.latency_tokens:
            x = torch.randn(n, d)

            def cycler(pool):
                state = {"i": 0}

                def fn():
                    m = pool[state["i"] % len(pool)]
                    state["i"] += 1
                    with torch.no_grad():
                        m(x)
                return fn

            reps = args.latency_reps if n <= 64 else max(5, args.latency_reps // 30)
            times = time_interleaved({k: cycler(p) for k, p in pools.items()}, device,
                                     warmup=2 * max(map(len, pools.values())), reps=reps, budget_s=args.budget)
            vs_lin = ", ".join(f"{times['linear'] / times[k]:.1f}x" for k in ("fp32", "bf16", "int8"))
            vs_bag = ", ".join(f"{times['ebag'] / times[k]:.1f}x" for k in ("fp32", "bf16", "int8"))
            row_bytes = {"fp32": 4 * d, "bf16": 2 * d, "int8": d + 4}  # per row hit (int8: + its fp32 scale)
            gbs = ", ".join(f"{n * (d // TAU) * row_bytes[k] / times[k] / 1e9:.1f}" for k in ("fp32", "bf16", "int8"))
            line = (f"| {n} | {cache} | " + " | ".join(fmt_time(times[k]) for k in kinds)
                    + f" | {vs_lin} | {vs_bag} | {gbs} |")
            print(line, flush=True)
            lines.append(line)
        del pools
        gc.collect()
    return lines + [""]


def bench_gather(args) -> list[str]:
    """The compiled 1-token gather over a cold pool of int8 / bf16 tables, variant by variant, interleaved."""
    from memoryformer.inference import to_huge_pages
    from memoryformer.ops import cpu_ext

    ext = cpu_ext.get()
    if ext is None:
        return ["(compiled kernels unavailable: gather variants skipped)", ""]
    lines = [
        f"## Compiled gather, 1 token, cold pool of {args.cold_mb} MB per variant (> LLC)",
        "",
        "Each call hashes one random input and sums its K rows (fp32 accumulation, int8 rows dequantised in",
        "registers, scale folded into the weight), cycling through the pool so every row comes from DRAM. GB/s =",
        "bytes of the K rows (+ int8 scales) / time per call.",
        "",
        "| table (K x R x h) | dtype | prefetch | threads | huge pages | time / call | GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    threads_before = cpu_ext.threads()
    for K, tau, h in args.gather_shapes:
        R = 2**tau
        for dtype in args.gather_dtypes:
            elem = 1 if dtype == "int8" else 2
            per = K * R * h * elem
            n = max(2, math.ceil((args.cold_mb << 20) / per))
            g = torch.Generator().manual_seed(0)
            base = []
            for _ in range(n):
                if dtype == "int8":
                    t = torch.randint(-127, 128, (K, R, h), dtype=torch.int8, generator=g)
                else:
                    t = (torch.randn(K, R, h, generator=g) * 0.02).to(getattr(torch, dtype))
                base.append(t)
            scale = torch.full((K, R), 0.02 / 73) if dtype == "int8" else None
            pools = {False: base, True: [to_huge_pages(t) for t in base]}
            x = torch.randn(1, K * tau)
            variants = [(pf, th, hp) for pf in (0, 8) for th in (1, 2) for hp in (False, True)]
            fns = {}
            for pf, th, hp in variants:
                state = {"i": 0}

                def fn(pf=pf, th=th, pool=pools[hp], state=state):
                    ext.set_prefetch(pf)
                    ext.set_threads(th)
                    t = pool[state["i"] % len(pool)]
                    state["i"] += 1
                    ext.decode(x, t, scale, None, tau, True, 1.0)
                fns[(pf, th, hp)] = fn
            times = time_interleaved(fns, torch.device("cpu"), warmup=2 * n, reps=args.latency_reps,
                                     budget_s=args.budget)
            row_bytes = K * h * elem + (K * 4 if dtype == "int8" else 0)
            for (pf, th, hp), t in times.items():
                line = (f"| {K} x {R} x {h} | {dtype} | {'on (8 rows)' if pf else 'off'} | {th} | "
                        f"{'yes' if hp else 'no'} | {fmt_time(t)} | {row_bytes / t / 1e9:.1f} |")
                print(line, flush=True)
                lines.append(line)
            del pools, base
            gc.collect()
    ext.set_prefetch(8)
    ext.set_threads(threads_before)
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="layer dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024])
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default 1 16 16384 (CUDA), 1 16 2048 (CPU)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--section", nargs="+", default=None, choices=["layer", "latency"])
    p.add_argument("--latency-tokens", type=int, nargs="+", default=[1, 4, 16, 2048])
    p.add_argument("--latency-dim", type=int, default=1024)
    p.add_argument("--cache", nargs="+", default=["hot", "cold"], choices=["hot", "cold"])
    p.add_argument("--cold-mb", type=int, default=1024)
    p.add_argument("--gather-shapes", type=lambda v: tuple(int(a) for a in v.split("x")), nargs="*",
                   default=[(96, 8, 2304), (96, 10, 768)], help="KxTAUxH tables of the gather variants ([] to skip)")
    p.add_argument("--gather-dtypes", nargs="+", default=["int8", "bfloat16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--latency-reps", type=int, default=300)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per measurement at most")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fwd-tile", default=None, help="Triton forward tile TOKENSxDIMS (default 32x64), for sweeps")
    p.add_argument("--bwd-tile", default=None, help="Triton grad-weights tile TOKENSxDIMS (default 32x128)")
    p.add_argument("--seg-tile", default=None, help="Triton sorted table-grad tile TOKENSxDIMS (default 16x128)")
    p.add_argument("--table-grad", default=None, choices=["sorted", "atomic"], help="Triton table gradient")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/kernels_<device>_<date>.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = {k.removesuffix("_tile"): tuple(int(v) for v in getattr(args, k).lower().split("x"))
              for k in ("fwd_tile", "bwd_tile", "seg_tile") if getattr(args, k)}
    config.update(dict(table_grad=args.table_grad) if args.table_grad else {})
    if config:
        from memoryformer.ops import triton_backend

        triton_backend.register(**config)  # the "triton" backend with these kernels (eager)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.tokens = args.tokens or ([1, 16, 16384] if device.type == "cuda" else [1, 16, 2048])
    sections = args.section or (["layer"] if device.type == "cuda" else ["layer", "latency"])
    out = header("Memory Layer kernels vs nn.Linear", device, sys.argv)
    if device.type == "cuda" or "triton" in " ".join(args.backends or []):
        from memoryformer.ops import triton_kernels as tk

        c = tk.KernelConfig(**config)
        out.insert(-1, f"- Triton tiles: forward {c.fwd[0]}x{c.fwd[1]}, grad-weights "
                       f"{c.bwd[0]}x{c.bwd[1]}, table grad {c.table_grad} {c.seg[0]}x{c.seg[1]}")
    print("\n".join(out), flush=True)
    if "layer" in sections:
        out += bench_layers(args, device, dtype)
    if "latency" in sections:
        out += bench_latency(args)
        if args.gather_shapes and "cold" in args.cache:
            out += bench_gather(args)
    out.append(f"- {load()} at end")
    print(out[-1])
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        day = datetime.date.today().isoformat()
        path = RESULTS / f"kernels_{slug(device_name(device))}_{day}.md"
        path.write_text("\n".join(out) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
