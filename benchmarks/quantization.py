"""Validation perplexity of a trained MemoryFormer with fp32, bf16, int8 (one scale per row) and int4 (one fp16
scale per group of G values) Memory Layer tables, head and embedding, and the tables' bytes of the presets.

    python benchmarks/quantization.py CHECKPOINT_DIR                       # the bundled sample's validation text
    python benchmarks/quantization.py CHECKPOINT_DIR --data path/or/hf:... # memoryformer.data's val split of a source
    python benchmarks/quantization.py CHECKPOINT_DIR --tokens val.npy      # token ids: .npy, raw uint16 .bin, or .txt
    python benchmarks/quantization.py CHECKPOINT_DIR --variants float32 int4-g64 int4-g64:int8 --out results/q.md

A variant is TABLES[:ROWS]: TABLES one of float32, bfloat16, int8, int4-g<G>, int4-row (one scale per row),
int4-g<G>-clip (each group's scale searched over clipping ratios `CLIP_GRID`, least squared error); ROWS the head
and embedding, float32 (default), bfloat16, int8, int4-g<G>. Everything else stays fp32. The same validation windows
(non-overlapping, seq_len + 1 tokens) are scored for every variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
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
from memoryformer.ops.int4 import group_count, parse_int4_name, quantize_int4

VARIANTS = ("float32", "bfloat16", "int8", "int4-g32", "int4-g64", "int4-g128", "int4-row", "int4-g64-clip",
            "int8:int8", "int4-g64:int8", "int4-g64:int4-g64", "float32:int4-g64")
CLIP_GRID = (0.95, 0.9, 0.85, 0.8, 0.75)  # ratios of the absmax scale tried per group by the "-clip" variants
FOOTPRINT_PRESETS = ("micro", "tiny", "small", "base")


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
    with torch.no_grad():
        nll, n = window_nll(model, tokens, starts, seq_len, batch, device)
    return math.exp(nll / n), n


def _bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def table_bytes(model) -> int:
    return sum(_bytes(m.tables, m.scale) for m in model.modules() if isinstance(m, MemoryLayer))


def rows_bytes(model) -> int:
    """Bytes of the head and the embedding as stored (weight + scale)."""
    return sum(_bytes(m.weight, getattr(m, "scale", None)) for m in (model.head, model.embed))


def parse_variant(v: str) -> tuple[str, int | None, bool, str]:
    """(tables dtype, int4 group or None, clip search, head/embedding spec) of a variant name."""
    tables, _, rows = v.partition(":")
    clip = tables.endswith("-clip")
    tables = tables.removesuffix("-clip")
    group = parse_int4_name(tables)
    if group is None and tables not in ("float32", "bfloat16", "int8"):
        raise SystemExit(f"variant: unknown tables {tables!r} in {v!r} (see --help)")
    return ("int4" if group is not None else tables), group, clip, rows or "float32"


@torch.no_grad()
def freeze_variant(model, v: str):
    """Freeze `model` (fp32, as trained) as variant `v`, in place."""
    tables, group, clip, rows = parse_variant(v)
    if clip:  # each group's scale searched over CLIP_GRID
        for m in model.modules():
            if isinstance(m, MemoryLayer):
                m.set_frozen(*quantize_int4(m.tables.detach(), group, clip=CLIP_GRID), m.tables.dtype, group)
    elif tables != "float32":
        freeze(model, tables, head="float32", huge_pages=False, group_size=group)
    if rows != "float32":
        g = parse_int4_name(rows)
        freeze(model, None, head="int4" if g is not None else rows, huge_pages=False, group_size=g)
    return model


def measure(args, tokens) -> list[dict]:
    rows, base = [], None
    for v in args.variants:
        model = memoryformer.load(args.checkpoint, device=args.device)
        t = time.perf_counter()
        freeze_variant(model, v)
        freeze_s = time.perf_counter() - t
        seq = args.seq_len or model.config.max_seq_len
        t = time.perf_counter()
        ppl, n = perplexity(model, tokens, seq, args.max_tokens, args.batch, torch.device(args.device))
        secs = time.perf_counter() - t
        base = base if base is not None else ppl
        rows.append(dict(variant=v, ppl=ppl, drift_pct=100 * (ppl / base - 1), table_bytes=table_bytes(model),
                         rows_bytes=rows_bytes(model), tokens=n, seq_len=seq, eval_s=secs, freeze_s=freeze_s))
        print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def preset_bytes(name: str) -> dict:
    """Bytes of a preset's Memory Layer tables and of its head + embedding at each storage, from the shapes only."""
    from memoryformer.model import build_model

    with torch.device("meta"):
        model = build_model(memoryformer.get_config(name))
    tabs = [m.tables.shape for m in model.modules() if isinstance(m, MemoryLayer)]
    rows = [model.head.weight.shape, model.embed.weight.shape]

    def size(shapes, dtype: str, group: int | None = 64) -> int:
        n = 0
        for s in shapes:
            lead, h = math.prod(s[:-1]), s[-1]
            n += {"float32": 4 * lead * h, "bfloat16": 2 * lead * h, "int8": lead * (h + 4),
                  "int4": lead * (h // 2 + 2 * group_count(h, group))}[dtype]
        return n

    out = {"preset": name, "table_params": sum(math.prod(s) for s in tabs)}
    for dt in ("float32", "bfloat16", "int8"):
        out[f"tables_{dt}"] = size(tabs, dt)
    for g in (32, 64, 128, None):
        out["tables_" + (f"int4-g{g}" if g else "int4-row")] = size(tabs, "int4", g)
    out["rows_float32"], out["rows_int8"], out["rows_int4-g64"] = (size(rows, "float32"), size(rows, "int8"),
                                                                   size(rows, "int4"))
    return out


def machine() -> dict:
    name = "CPU"
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=name, threads=torch.get_num_threads(), torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                load_average=" ".join(f"{x:.2f}" for x in os.getloadavg()))


def report(args, rows: list[dict], feet: list[dict], info: dict) -> list[str]:
    mib = 2**20
    out = [f"Validation perplexity of `{args.checkpoint}` with frozen tables / head+embedding ({rows[0]['tokens']} "
           f"tokens scored, seq_len {rows[0]['seq_len']}, {args.device}; source: "
           f"{args.tokens or args.data or 'bundled sample val'})" if rows else "",
           "", f"- machine: {info['cpu']}, {info['threads']} threads; torch {info['torch']}; {info['date']}; load "
           f"average {info['load_average']} at the start, {info.get('load_end', '?')} at the end",
           f"- command: `{info['command']}`", ""]
    if rows:
        out += ["| variant (tables:head+embedding) | val PPL | drift vs fp32 | table bytes | head+embedding bytes | "
                "eval time |", "|---|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {r['ppl']:.4f} | {r['drift_pct']:+.3f} % | {r['table_bytes'] / mib:.2f} MiB | "
                f"{r['rows_bytes'] / mib:.2f} MiB | {r['eval_s']:.1f} s |" for r in rows]
        out.append("")
    if feet:
        out += ["Memory Layer table MiB of the presets (from the configs' shapes; int8: + a fp32 scale per row, "
                "int4: two values per byte + a fp16 scale per group), and the head + embedding's:", "",
                "| preset | table params | fp32 | bf16 | int8 | int4 G=32 | int4 G=64 | int4 G=128 | int4 row | "
                "head+emb fp32 | int8 | int4 G=64 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in feet:
            cells = [f[k] / mib for k in ("tables_float32", "tables_bfloat16", "tables_int8", "tables_int4-g32",
                                          "tables_int4-g64", "tables_int4-g128", "tables_int4-row", "rows_float32",
                                          "rows_int8", "rows_int4-g64")]
            out.append(f"| {f['preset']} | {f['table_params'] / 1e6:.1f} M | "
                       + " | ".join(f"{c:,.1f}" for c in cells) + " |")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="directory written by memoryformer.save_model (model.safetensors + config.json)")
    p.add_argument("--data", default=None, help="source for memoryformer.data.val_tokens (default: bundled sample)")
    p.add_argument("--tokens", default=None, help="token ids file instead of --data: .npy, raw uint16 .bin, or .txt")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="see above; the first is the reference")
    p.add_argument("--footprint", nargs="*", default=list(FOOTPRINT_PRESETS), help="presets whose bytes to list")
    p.add_argument("--out", default=None, help="also write the markdown table here (and the figures as .json)")
    args = p.parse_args(argv)
    for v in args.variants:
        parse_variant(v)
    info = machine()
    info["command"] = "python benchmarks/quantization.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = measure(args, read_tokens(args)) if args.variants else []
    feet = [preset_bytes(n) for n in args.footprint]
    info["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = report(args, rows, feet, info)
    print("\n".join(out))
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(dict(info, variants=rows, footprint=feet), indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
