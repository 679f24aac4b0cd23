"""One MemoryFormer block against one Pythia (GPT-NeoX) block of the same width, measured in the same run.

    python benchmarks/block.py                            # CUDA: B=8, T=2048, bf16 autocast, d = 512 768 1024
    python benchmarks/block.py --device cpu --batch 1 --seq 256 --dims 512 --no-autocast
    python benchmarks/block.py --backends triton triton-unfused embedding_bag --table-dtype bfloat16 --save

Both blocks keep fp32 parameters and run under bf16 autocast (the training setting); the Memory Layer tables are
converted to --table-dtype (default bf16 on CUDA), because autocast does not touch table lookups and an fp32 table
moves twice the bytes. Ratio = MemoryFormer block time / Pythia block time (< 1: MemoryFormer is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_timing import (  # noqa: E402
    RESULTS, device_name, fmt_time, header, load, slug, time_interleaved, triton_hash_fusion,
)

from memoryformer import MemoryLayer, get_config  # noqa: E402
from memoryformer.model import MemoryFormerBlock, Rotary, TransformerBlock  # noqa: E402

PRESETS = {512: ("tiny", "pythia-70m"), 768: ("small", "pythia-160m"), 1024: ("base", "pythia-410m")}


def configs(d: int, seq: int):
    mf_name, dense_name = PRESETS.get(d, ("tiny", "pythia-70m"))
    over = dict(max_seq_len=seq) if d in PRESETS else dict(max_seq_len=seq, d_model=d, n_head=max(1, d // 64))
    return get_config(mf_name, **over), get_config(dense_name, **over)


def build(cfg, block_cls, device):
    rotary = Rotary(cfg.rotary_dims, cfg.max_seq_len, cfg.rotary_base).to(device)
    return block_cls(cfg, rotary).to(device)


def step_fn(block, x, mode, autocast, fuse_hash=True):
    def ctx():
        stack = contextlib.ExitStack()
        stack.enter_context(triton_hash_fusion(fuse_hash))
        if autocast:
            stack.enter_context(torch.autocast(x.device.type, dtype=torch.bfloat16))
        return stack

    if mode == "fwd":
        def fwd():
            with torch.no_grad(), ctx():
                block(x)
        return fwd
    xg = x.detach().requires_grad_()

    def fwd_bwd():
        for p in block.parameters():
            p.grad = None
        with ctx():
            y = block(xg)
            y.float().sum().backward()
    return fwd_bwd


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--no-autocast", action="store_true")
    p.add_argument("--table-dtype", default=None, help="Memory Layer tables (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backends", nargs="+", default=None, help="default: triton embedding_bag (CUDA), auto (CPU)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--compile", action="store_true", help="torch.compile both blocks")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", action="store_true", help="write benchmarks/results/kernels_block_<device>_<date>.md")
    return p.parse_args(argv)


def build_blocks(d: int, args, backends: list[str], tdt: torch.dtype, device: torch.device):
    """The Pythia block and one MemoryFormer block per backend (tables in `tdt`), compiled with --compile."""
    mf_cfg, dense_cfg = configs(d, args.seq)
    dense = build(dense_cfg, TransformerBlock, device)
    mfs = {}
    for b in backends:
        blk = build(mf_cfg, MemoryFormerBlock, device)
        for m in blk.modules():
            if isinstance(m, MemoryLayer):
                m.backend = b.removesuffix("-unfused")
                m.tables.data = m.tables.data.to(tdt)
        mfs[b] = torch.compile(blk) if args.compile else blk
    if args.compile:
        dense = torch.compile(dense)
    return dense, mfs


def time_pass(dense, mfs: dict, x: torch.Tensor, mode: str, args, autocast: bool) -> dict[str, float]:
    """Seconds per pass of each block, interleaved; NaN for a backend that is unavailable or fails here."""
    d, device = x.shape[-1], x.device
    fns = {"pythia": step_fn(dense, x, mode, autocast)}
    fns.update({b: step_fn(m, x, mode, autocast, fuse_hash=not b.endswith("-unfused")) for b, m in mfs.items()})
    times = {}
    for b, blk in mfs.items():  # an explicit backend that would fall back to another is not measured
        layer = next(m for m in blk.modules() if isinstance(m, MemoryLayer))
        with torch.set_grad_enabled(mode != "fwd"):
            ran = layer.active_backend()
        if ran != b.removesuffix("-unfused") and b != "auto":
            print(f"  ({b} {mode} d={d}: not available here, would run {ran!r})", file=sys.stderr)
            times[b] = float("nan")
            del fns[b]
    for name, fn in list(fns.items()):
        try:
            fn()
        except (RuntimeError, NotImplementedError) as e:
            print(f"  ({name} {mode} d={d}: {type(e).__name__}: {str(e)[:100]})", file=sys.stderr)
            times[name] = float("nan")
            del fns[name]
    times.update(time_interleaved(fns, device, reps=args.reps, budget_s=args.budget))
    return times


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = not args.no_autocast
    default_tdt = torch.bfloat16 if device.type == "cuda" else torch.float32
    tdt = getattr(torch, args.table_dtype) if args.table_dtype else default_tdt
    backends = args.backends or (["triton", "triton-unfused", "embedding_bag"] if device.type == "cuda" else ["auto"])
    out = header("MemoryFormer block vs Pythia block", device, sys.argv)
    out += [
        f"B={args.batch}, T={args.seq}, {'bf16 autocast' if autocast else 'no autocast'}, "
        f"Memory Layer tables {str(tdt).removeprefix('torch.')}{', torch.compile' if args.compile else ''}",
        "",
        "| d | pass | Pythia block | " + " | ".join(f"MF block ({b})" for b in backends) + " | best MF / Pythia |",
        "|---|---|---|" + "---|" * len(backends) + "---|",
    ]
    print("\n".join(out), flush=True)
    for d in args.dims:
        torch.manual_seed(0)
        x = torch.randn(args.batch, args.seq, d, device=device)
        dense, mfs = build_blocks(d, args, backends, tdt, device)
        for mode in args.modes:
            times = time_pass(dense, mfs, x, mode, args, autocast)
            best = min((times[b] for b in backends if times[b] == times[b]), default=float("nan"))
            line = (f"| {d} | {'fwd' if mode == 'fwd' else 'fwd+bwd'} | {fmt_time(times['pythia'])} | "
                    + " | ".join(fmt_time(times[b]) for b in backends) + f" | {best / times['pythia']:.2f}x |")
            print(line, flush=True)
            out.append(line)
        del dense, mfs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out += ["", f"- {load()} at end"]
    print(out[-1])
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"kernels_block_{slug(device_name(device))}_{datetime.date.today().isoformat()}.md"
        path.write_text("\n".join(out) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
