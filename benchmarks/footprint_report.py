"""Training memory per preset and table option on one GPU (memoryformer.footprint), as a results table.

    python benchmarks/footprint_report.py --gpu-mem 80GB --seq-len 2048 --batch 4

For each MemoryFormer preset and its dense control: parameters, gradients, optimizer state, their sum (the
training state), activations at `--batch` x `--seq-len` tokens per micro-batch, the total with the CUDA runtime
and reserve, whether it fits, and the largest micro-batch that fits. Writes
benchmarks/results/footprint_<gpu>_<date>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from memoryformer.config import DENSE_CONTROL
from memoryformer.footprint import OPTIONS, GB, footprint, max_batch, parse_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--batch", type=int, default=4, help="micro-batch in sequences")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--gpu-mem", default="80GB")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args(argv)
    mem = parse_bytes(a.gpu_mem)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"# Training memory on one {a.gpu_mem} GPU per table option (memoryformer.footprint)", "",
             f"- date: {date}; computed, not measured on a GPU (the CPU check against peak RSS is in "
             "train_speed_*.md)",
             f"- command: `python benchmarks/footprint_report.py --gpu-mem {a.gpu_mem} --seq-len {a.seq_len} "
             f"--batch {a.batch}`",
             f"- micro-batch {a.batch} x {a.seq_len} tokens; fp32 activations (an upper bound under bf16 autocast); "
             "total = peak x 1.1 + 1.5 GB CUDA runtime; fused AdamW for the dense weights; dense table gradients "
             "(sparse rows are a CPU path)", ""]
    for preset in a.presets:
        dense = DENSE_CONTROL[preset]
        f0 = footprint(preset, a.batch, a.seq_len)
        lines += [f"## MF-{preset} ({f0['dense_params'] / 1e6:,.0f} M dense + {f0['table_params'] / 1e6:,.0f} M "
                  f"table parameters) and {dense}", "",
                  "| model / tables | params | grads | optimizer | training state | activations | total | "
                  f"fits {a.gpu_mem} | max micro-batch |", "|---|---|---|---|---|---|---|---|---|"]
        rows = [(preset, o, d) for o, d in OPTIONS] + [(dense, "adamw", "float32")]
        for cfg, o, d in rows:
            f = footprint(cfg, a.batch, a.seq_len, table_optim=o, table_dtype=d, gpu_mem=mem)
            mb = max_batch(cfg, a.seq_len, gpu_mem=mem, table_optim=o, table_dtype=d)
            name = f"{o} / {d}" if cfg == preset else f"{dense} (AdamW)"
            lines.append(f"| {name} | {f['params'] / GB:.1f} GB | {f['grads'] / GB:.1f} GB | "
                         f"{f['optimizer'] / GB:.1f} GB | **{f['state'] / GB:.1f} GB** | {f['activations'] / GB:.1f} GB | "
                         f"{f['total'] / GB:.1f} GB | {'yes' if f['fits'] else 'no'} | {mb} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    out = Path(a.results) / f"footprint_{a.gpu_mem.lower()}_{date}.md"
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
