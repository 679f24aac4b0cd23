"""CPU decode speed, batch 1, greedy: MemoryFormer (compiled engine, and the eager path) against Hugging Face GPTNeoX
and llama.cpp at the Pythia-70M / Pythia-160M shapes, measured in the same run, interleaved, medians of rounds.

    python benchmarks/decode.py --threads 2 --save
    python benchmarks/decode.py --threads 2 --save \\
        --llama-bench ~/.cache/llama-anchor/llama.cpp/build/bin/llama-bench --gguf-dir ~/.cache/llama-anchor/gguf
    python benchmarks/decode.py --section head        # the LM-head kernel candidates only

Every model has random weights built directly in its inference precision (`memoryformer.inference.
random_inference_model`, on the meta device first), so an int8 MF-small never holds more than its ~2 GB; speed does
not depend on the values. Each system decodes `--new` tokens after a `--prompt`-token prompt; tokens/s counts the
decode steps only (argmax included), the prompt is timed separately. llama.cpp runs as `llama-bench -p 0 -n NEW
-d PROMPT` (NEW tokens generated at a context depth of PROMPT tokens, f16 KV cache, no sampling).

Sections:
  decode   tokens/s of every system; ratios at equal precision; bytes read per token and the effective GB/s.
  context  MemoryFormer engine decode speed after a `--long-context`-token prompt against after `--prompt`.
  head     the LM head (vocab 50 304 x 768) alone: the kernels considered for the quantised head.
  quality  validation perplexity of a trained checkpoint (--checkpoint) with int8 / bf16 tables, head, embedding.
  batch    B sequences at once (--batch 1,4,8,16) against llama-batched-bench; prompt: a --pp prompt (decode_batch.py).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_timing import (LLAMA, PAIRS, PHASES, PRECISIONS, dense_bytes_per_token, mf_bytes_per_token,  # noqa: E402
                           mf_model, one_min_load, profile_engine, run_engine)
from kernel_timing import RESULTS, device_name, header, load, slug  # noqa: E402
import decode_batch  # noqa: E402

import memoryformer as mf  # noqa: E402
from memoryformer import inference as inf  # noqa: E402
from memoryformer.ops import cpu_ext  # noqa: E402



def stream_gbs(mb: int = 512, reps: int = 5) -> float:
    """Sequential read bandwidth of this machine with the kernels' threads: the fp32 GEMV over `mb` MB."""
    ext = cpu_ext.get()
    w = torch.ones((mb << 20) // (256 * 4), 256)
    x = torch.ones(1, 256)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        ext.gemv(x, w, None)
        ts.append(time.perf_counter() - t)
    return w.numel() * 4 / statistics.median(ts) / 1e9


# ---------------------------------------------------------------------------------------------------------------
# Systems


@torch.inference_mode()
def run_eager(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """The same through the eager model's KV-cached path (what `memoryformer.generate` runs)."""
    B, T = prompt.shape
    t0 = time.perf_counter()
    cache = mf.KVCache.for_model(model, B, T + new + 1)  # static, written in place
    logits = model.head(model.hidden(prompt, cache=cache)[:, -1])
    t1 = time.perf_counter()
    for _ in range(new):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model.head(model.hidden(nxt, cache=cache)[:, -1])
    return t1 - t0, time.perf_counter() - t1


def hf_model(size: str, prec: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    L, d, h = {"70m": (6, 512, 8), "160m": (12, 768, 12)}[size]
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=d, num_hidden_layers=L, num_attention_heads=h,
                        intermediate_size=4 * d, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048,
                        use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(cfg).to(torch.float32 if prec == "fp32" else torch.bfloat16).eval()


@torch.inference_mode()
def run_hf(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    t1 = time.perf_counter()
    for _ in range(new):
        out = model(logits.argmax(-1, keepdim=True), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return t1 - t0, time.perf_counter() - t1


def run_llama(bench: str, gguf: Path, prompt: int, new: int, threads: int) -> float:
    """tokens/s of llama-bench generating `new` tokens at a context depth of `prompt` (one repetition)."""
    cmd = [bench, "-m", str(gguf), "-p", "0", "-n", str(new), "-d", str(prompt), "-t", str(threads), "-r", "1",
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


# ---------------------------------------------------------------------------------------------------------------
# Sections


def decode_systems(args) -> list[tuple]:
    """(key, kind, size or gguf file, precision) of every system the decode section times."""
    systems = []
    for size in args.configs:
        for prec in args.precisions:
            systems.append((f"mf-{size}-{prec}-engine", "engine", size, prec))
            if args.eager:
                systems.append((f"mf-{size}-{prec}-eager", "eager", size, prec))
    for size in args.configs:
        for prec in ("fp32", "bf16"):
            if prec in args.precisions:
                systems.append((f"hf-{PAIRS[size]}-{prec}", "hf", PAIRS[size], prec))
        if args.llama_bench:
            for prec in args.precisions:
                f = Path(args.gguf_dir) / f"pythia-{PAIRS[size]}-{LLAMA[prec]}.gguf"
                if f.is_file():
                    systems.append((f"llama-{PAIRS[size]}-{LLAMA[prec]}", "llama", f, prec))
                else:
                    print(f"  (no {f}: llama.cpp {LLAMA[prec]} skipped)", file=sys.stderr)
    return systems


def time_systems(args, systems: list[tuple], prompt: torch.Tensor) -> dict:
    """Interleaved rounds over every system (a different one starts each round): tokens/s, prompt seconds, the
    load at each round's start, and the engine's phase profile."""
    rates: dict[str, list[float]] = {k: [] for k, *_ in systems}
    prefill: dict[str, list[float]] = {k: [] for k, *_ in systems}
    loads: list[float] = []
    hf_cache: dict[str, torch.nn.Module] = {}
    phases: dict[str, list[dict[str, float]]] = {}
    for r in range(args.rounds):
        loads.append(one_min_load())
        order = systems[r % len(systems):] + systems[: r % len(systems)]
        built: dict[tuple, torch.nn.Module] = {}
        for key, kind, where, prec in order:
            if kind in ("engine", "eager"):
                mkey = (where, prec)
                if mkey not in built:  # one MemoryFormer alive at a time: the engine and eager runs share it
                    built.clear()
                    gc.collect()
                    built[mkey] = mf_model(where, prec)
                model = built[mkey]
                run = run_engine if kind == "engine" else run_eager
                run(model, prompt[:, :4], 4)  # warm-up (build of the engine, first-touch of buffers)
                pre, dec = run(model, prompt, args.new)
                if kind == "engine":
                    phases.setdefault(key, []).append(profile_engine(model, prompt, args.new))
            elif kind == "hf":
                model = hf_cache.setdefault(key, hf_model(where, prec))
                run_hf(model, prompt[:, :4], 4)
                pre, dec = run_hf(model, prompt, args.new)
            else:
                rates[key].append(run_llama(args.llama_bench, where, args.prompt, args.new, args.threads))
                print(f"  round {r}: {key} {rates[key][-1]:.1f} tok/s", flush=True)
                continue
            rates[key].append(args.new / dec)
            prefill[key].append(pre)
            print(f"  round {r}: {key} {args.new / dec:.1f} tok/s (prompt {pre * 1e3:.0f} ms), load {one_min_load():.2f}",
                  flush=True)
        built.clear()
        gc.collect()
    loads.append(one_min_load())
    return dict(rates=rates, prefill=prefill, loads=loads, phases=phases)


def speed_rows(args, systems: list[tuple], t: dict, med: dict[str, float], gbs: float, lines: list[str]) -> list:
    """The tokens/s table: bytes per token, effective GB/s and the bound at the stream bandwidth."""
    rows = []
    for key, kind, where, prec in systems:
        if key not in med:
            continue
        ctx = args.prompt + args.new // 2  # the mean context of the decode steps
        if kind in ("engine", "eager"):
            b = mf_bytes_per_token(mf.get_config(where), prec, ctx)["total"]
        else:
            pythia = where if kind == "hf" else Path(where).name.split("-")[1]
            b = dense_bytes_per_token(mf.get_config(f"pythia-{pythia}"), prec, ctx)["total"]
        pre = f"{statistics.median(t['prefill'][key]) * 1e3:.0f}" if t["prefill"][key] else "n/a"
        rows.append(dict(system=key, precision=prec, tok_s=med[key], rounds=t["rates"][key], prompt_ms=pre,
                         bytes_per_token=b, effective_gbs=b * med[key] / 1e9, bound_tok_s=gbs * 1e9 / b))
        lines.append(f"| {key} | {prec} | {med[key]:.1f} | {pre} | {b / 1e6:.1f} MB | {b * med[key] / 1e9:.1f} | "
                     f"{gbs * 1e9 / b:.0f} tok/s |")
    return rows


def ratio_lines(args, med: dict[str, float], lines: list[str]) -> dict:
    """MemoryFormer engine over every other system at equal weight precision."""
    lines += ["", "Ratios (tokens/s, MemoryFormer engine over the other at equal weight precision):", ""]
    ratios = {}
    for size in args.configs:
        for prec in args.precisions:
            ours = med.get(f"mf-{size}-{prec}-engine")
            if ours is None:
                continue
            for other in (f"mf-{size}-{prec}-eager", f"hf-{PAIRS[size]}-{prec}", f"hf-{PAIRS[size]}-fp32",
                          f"llama-{PAIRS[size]}-{LLAMA[prec]}"):
                if other in med and (size, prec, other) not in ratios:
                    ratios[(size, prec, other)] = ours / med[other]
                    lines.append(f"- mf-{size}-{prec}-engine / {other}: **{ours / med[other]:.2f}x**")
    return {f"mf-{s}-{p}-engine/{o}": v for (s, p, o), v in ratios.items()}


def phase_lines(phases: dict[str, list[dict[str, float]]], lines: list[str]) -> dict:
    """Median milliseconds per decode step in each phase of the engine."""
    lines += ["", "Where an engine decode step goes (ms per token, median over rounds, from the engine's own profiler in "
              "an extra pass; `rest` = norms, residuals, rotary and attention, the non-gather work):", "",
              "| system | " + " | ".join(PHASES) + " | rest | total |", "|---|" + "---|" * (len(PHASES) + 2)]
    phase_rows = {}
    for key, runs in phases.items():
        m = {k: statistics.median(r[k] for r in runs) for k in PHASES}
        m["rest"] = m["attention"] + m["norms_residuals"]
        m["total"] = sum(m[k] for k in PHASES)
        phase_rows[key] = m
        lines.append(f"| {key} | " + " | ".join(f"{m[k]:.3f}" for k in PHASES) + f" | {m['rest']:.3f} | "
                     f"{m['total']:.3f} |")
    lines.append("")
    return phase_rows


def section_decode(args, lines: list[str], record: dict) -> None:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50277, (1, args.prompt), generator=g)
    systems = decode_systems(args)
    t = time_systems(args, systems, prompt)
    loads = t["loads"]
    med = {k: statistics.median(v) for k, v in t["rates"].items() if v}
    gbs = stream_gbs()
    lines += [
        f"## Decode: batch 1, greedy, {args.prompt}-token prompt, {args.new} new tokens, {args.threads} threads",
        "",
        f"Median of {args.rounds} interleaved rounds; 1-minute load average at each round's start: "
        + ", ".join(f"{x:.2f}" for x in loads[:-1]) + f" (end {loads[-1]:.2f}). Streaming read bandwidth measured in "
        f"this run (fp32 GEMV over 512 MB, {cpu_ext.threads()} threads): **{gbs:.1f} GB/s**.",
        "",
        "| system | precision | tokens/s | prompt (ms) | bytes/token | effective GB/s | bound at stream GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = speed_rows(args, systems, t, med, gbs, lines)
    ratios = ratio_lines(args, med, lines)
    phase_rows = phase_lines(t["phases"], lines)
    record["decode"] = dict(rows=rows, loads=loads, stream_gbs=gbs, phases_ms=phase_rows, ratios=ratios)


def section_context(args, lines: list[str], record: dict) -> None:
    g = torch.Generator().manual_seed(1)
    long = torch.randint(0, 50277, (1, args.long_context), generator=g)
    out, loads = [], []
    for size in args.configs:
        for prec in args.precisions:
            model = mf_model(size, prec)
            S = args.long_context + args.new + 1
            res = {"short": [], "long": []}
            for r in range(args.rounds):
                loads.append(one_min_load())
                for name, p in (("short", long[:, : args.prompt]), ("long", long)):
                    eng = inf.DecodeEngine(model, max_seq_len=S)
                    logits = eng.prefill(p)
                    t = time.perf_counter()
                    for _ in range(args.new):
                        logits = eng.step(logits.argmax(-1))
                    res[name].append(args.new / (time.perf_counter() - t))
            short, lng = statistics.median(res["short"]), statistics.median(res["long"])
            out.append(dict(model=f"mf-{size}-{prec}", short=short, long=lng, ratio=lng / short))
            print(f"  context: mf-{size}-{prec} {short:.1f} -> {lng:.1f} tok/s", flush=True)
            del model
            gc.collect()
    lines += [
        f"## Context: engine decode after {args.prompt} vs {args.long_context} prompt tokens ({args.new} new)",
        "",
        f"1-minute load at the rounds' starts: {', '.join(f'{x:.2f}' for x in loads)}. The cache is fp32 for fp32 "
        "tables, else bf16.",
        "",
        f"| model | tok/s at {args.prompt} | tok/s at {args.long_context} | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {o['model']} | {o['short']:.1f} | {o['long']:.1f} | {o['ratio']:.2f} |" for o in out]
    lines.append("")
    record["context"] = dict(rows=out, loads=loads)


def section_head(args, lines: list[str], record: dict) -> None:
    """The quantised-head candidates on the MF-small head shape, one token, interleaved."""
    from kernel_timing import time_interleaved

    ext = cpu_ext.get()
    V, d = 50304, 768
    torch.manual_seed(0)
    w = torch.randn(V, d) * 0.03
    q, s = inf.quantize_rows(w)
    wb = w.bfloat16()
    x = torch.randn(1, d)
    fns = {
        "fp32 F.linear (MKL)": lambda: torch.nn.functional.linear(x, w),
        "fp32 ours (GEMV)": lambda: ext.gemv(x, w, None),
        "bf16 F.linear": lambda: torch.nn.functional.linear(x.bfloat16(), wb),
        "bf16 ours (GEMV, fp32 accumulation)": lambda: ext.gemv(x, wb, None),
        "int8 aten._weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s),
        "int8 ours, fp32 activations (dequantised in registers)": lambda: ext.gemv(x, q, s, False),
        "int8 ours, int16 activations (vpmaddwd)": lambda: ext.gemv(x, q, s, True),
    }
    try:  # fbgemm's dynamic-quantisation linear (uint8 activations, AVX2 maddubs), deprecated in torch >= 2.10
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, s.double(), torch.zeros(V, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qw, None)
        fns["int8 fbgemm quantized.linear_dynamic"] = lambda: torch.ops.quantized.linear_dynamic(x, packed, False)
    except (RuntimeError, AttributeError) as e:
        print(f"  (fbgemm linear_dynamic unavailable: {e})", file=sys.stderr)
    ref = (x.double() @ w.double().T)
    errs = {}
    for k, fn in fns.items():
        y = fn().double()
        errs[k] = ((y - ref).abs().max() / ref.abs().max()).item()
    start = one_min_load()
    times = time_interleaved(fns, torch.device("cpu"), warmup=3, reps=args.head_reps, budget_s=60)
    lines += [
        f"## LM head alone: ({V} x {d}) weight, one token, {cpu_ext.threads()} kernel threads / "
        f"{torch.get_num_threads()} torch threads",
        "",
        f"Interleaved medians; 1-minute load {start:.2f} at start. Error: max |y - y_fp64| / max |y_fp64| against "
        "the fp32 weight (int8 rows: absmax per output row).",
        "",
        "| kernel | time | weight GB/s | error |",
        "|---|---|---|---|",
    ]
    nbytes = {"fp32": V * d * 4, "bf16": V * d * 2, "int8": V * d + V * 4}
    rows = []
    for k, t in times.items():
        b = nbytes[k.split()[0]]
        rows.append(dict(kernel=k, ms=t * 1e3, gbs=b / t / 1e9, err=errs[k]))
        lines.append(f"| {k} | {t * 1e3:.2f} ms | {b / t / 1e9:.1f} | {errs[k]:.1e} |")
    lines.append("")
    record["head"] = dict(rows=rows, load=start)


QUALITY_VARIANTS = {  # name -> (tables, head, embed) for load_for_inference
    "fp32": ("float32", "float32", "float32"),
    "int8 tables": ("int8", "float32", "float32"),
    "int8 head + embedding": ("float32", "int8", "int8"),
    "int8 (tables, head, embedding)": ("int8", "int8", "int8"),
    "bf16 (tables, head, embedding)": ("bfloat16", "bfloat16", "bfloat16"),
}


def section_quality(args, lines: list[str], record: dict) -> None:
    """Validation perplexity of a trained checkpoint with each part quantised (`load_for_inference`)."""
    from quantization import perplexity, read_tokens

    if not args.checkpoint:
        raise SystemExit("--section quality needs --checkpoint DIR (a memoryformer.save_model directory)")
    tokens = read_tokens(argparse.Namespace(tokens=args.tokens, data=args.data))
    rows, base = [], None
    for name, (tables, head, embed) in QUALITY_VARIANTS.items():
        model = inf.load_for_inference(args.checkpoint, tables=tables, head=head, embed=embed)
        seq = model.config.max_seq_len
        ppl, n = perplexity(model, tokens, seq, args.ppl_tokens, 4, torch.device("cpu"))
        base = ppl if base is None else base
        rows.append(dict(variant=name, ppl=ppl, drift_pct=100 * (ppl / base - 1), tokens=n))
        print(f"  quality: {name} {ppl:.4f} ({rows[-1]['drift_pct']:+.3f} %)", flush=True)
        del model
        gc.collect()
    lines += [
        f"## Quality: validation perplexity of `{args.checkpoint}` ({rows[0]['tokens']} tokens, windows of {seq}; "
        f"source: {args.tokens or args.data or 'the bundled sample validation text'})",
        "",
        "| weights | val PPL | vs fp32 |",
        "|---|---|---|",
        *[f"| {r['variant']} | {r['ppl']:.4f} | {r['drift_pct']:+.3f} % |" for r in rows],
        "",
    ]
    record["quality"] = dict(checkpoint=str(args.checkpoint), rows=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", nargs="+", default=["head", "decode", "context"],
                    choices=["head", "decode", "context", "quality", "batch", "prompt"])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(PAIRS))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--long-context", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--head-reps", type=int, default=30)
    ap.add_argument("--no-eager", dest="eager", action="store_false", help="skip the eager MemoryFormer path")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench")
    ap.add_argument("--gguf-dir", default=None, help="folder with pythia-{70m,160m}-{f32,f16,q8_0}.gguf")
    ap.add_argument("--checkpoint", default=None, help="quality: a trained memoryformer.save_model directory")
    ap.add_argument("--data", default=None, help="quality: source for memoryformer.data.val_tokens (default: bundled)")
    ap.add_argument("--tokens", default=None, help="quality: token ids file (.npy, uint16 .bin, .txt) instead")
    ap.add_argument("--ppl-tokens", type=int, default=65536, help="quality: validation tokens scored")
    ap.add_argument("--out", default=None, help="write the markdown here instead of decode_<device>_<date>.md")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/decode_<device>_<date>.md/.json")
    decode_batch.add_args(ap)
    args = ap.parse_args(argv)
    if args.llama_bench and not args.gguf_dir:
        ap.error("--llama-bench needs --gguf-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
        cpu_ext.threads(args.threads)
    args.threads = torch.get_num_threads()
    if cpu_ext.get() is None:
        sys.exit("the compiled CPU kernels are unavailable (see the log line above); the engine cannot run")
    device = torch.device("cpu")
    lines = header("CPU decode: MemoryFormer engine vs GPTNeoX (transformers) and llama.cpp", device,
                   sys.argv if argv is None else ["benchmarks/decode.py", *argv])
    print("\n".join(lines), flush=True)
    record = dict(device=device_name(device), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  argv=sys.argv if argv is None else argv, torch=torch.__version__)
    for name in args.section:
        n = len(lines)
        {"head": section_head, "decode": section_decode, "context": section_context, "quality": section_quality,
         "batch": decode_batch.section_batch, "prompt": decode_batch.section_prompt}[name](args, lines, record)
        print("\n".join(lines[n:]), flush=True)
    lines.append(f"- {load()} at end")
    print(lines[-1])
    if args.save or args.out:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = Path(args.out).with_suffix("") if args.out else (
            RESULTS / f"decode_{slug(device_name(device))}_{datetime.date.today().isoformat()}")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {stem}.md / .json")
    return record


if __name__ == "__main__":
    main()
