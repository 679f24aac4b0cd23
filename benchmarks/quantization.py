"""Validation perplexity of a trained MemoryFormer with fp32, bf16 and int8 (one scale per row) Memory Layer tables.

    python benchmarks/quantization.py CHECKPOINT_DIR                       # the bundled sample's validation text
    python benchmarks/quantization.py CHECKPOINT_DIR --data path/or/hf:... # memoryformer.data's val split of a source
    python benchmarks/quantization.py CHECKPOINT_DIR --tokens val.npy      # token ids: .npy, raw uint16 .bin, or .txt

Only the Memory Layer tables change (`memoryformer.freeze` with head="float32"); everything else stays fp32. The same
validation windows (non-overlapping, seq_len + 1 tokens) are scored for every variant.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import memoryformer
from memoryformer.data import eval_starts
from memoryformer.evaluate import window_nll
from memoryformer.inference import freeze
from memoryformer.layers import MemoryLayer

VARIANTS = ("float32", "bfloat16", "int8")


def read_tokens(args) -> np.ndarray:
    if args.tokens:
        path = Path(args.tokens)
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r")
        if path.suffix == ".txt":
            from memoryformer.data import encode

            return np.asarray(encode(path.read_text(encoding="utf-8")), dtype=np.int64)
        return np.memmap(path, dtype=np.uint16, mode="r")
    from memoryformer.data import val_tokens

    return val_tokens(args.data)


def perplexity(model, tokens: np.ndarray, seq_len: int, max_tokens: int, batch: int, device) -> tuple[float, int]:
    """Validation perplexity over windows spread evenly over the tokens, as training's validation scores them."""
    starts = eval_starts(len(tokens), seq_len, max_tokens)
    nll, n = window_nll(model, tokens, starts, seq_len, batch, device)
    return math.exp(nll / n), n


def table_bytes(model) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, MemoryLayer):
            n += m.tables.numel() * m.tables.element_size()
            if m.scale is not None:
                n += m.scale.numel() * m.scale.element_size()
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="directory written by memoryformer.save_model (model.safetensors + config.json)")
    p.add_argument("--data", default=None, help="source for memoryformer.data.val_tokens (default: bundled sample)")
    p.add_argument("--tokens", default=None, help="token ids file instead of --data: .npy, raw uint16 .bin, or .txt")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    tokens = read_tokens(args)
    rows, base = [], None
    for v in args.variants:
        model = memoryformer.load(args.checkpoint, device=args.device)
        if v != "float32":
            freeze(model, v, head="float32", huge_pages=False)
        seq = args.seq_len or model.config.max_seq_len
        t = time.perf_counter()
        ppl, n = perplexity(model, tokens, seq, args.max_tokens, args.batch, torch.device(args.device))
        secs = time.perf_counter() - t
        base = base if base is not None else ppl
        mib = table_bytes(model) / 2**20
        rows.append(f"| {v} | {ppl:.4f} | {100 * (ppl / base - 1):+.3f} % | {mib:.1f} MiB | {secs:.1f} s |")
        print(rows[-1], flush=True)
        del model
    out = [
        f"Validation perplexity of `{args.checkpoint}` with inference tables ({n} tokens scored, seq_len {seq}, "
        f"{args.device}; source: {args.tokens or args.data or 'bundled sample val'})",
        "",
        "| tables | val PPL | vs fp32 | table bytes | time |",
        "|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(out))
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
