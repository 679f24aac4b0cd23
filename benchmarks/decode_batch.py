"""Sections of benchmarks/decode.py for many sequences at once and for long prompts, side by side with llama.cpp:

  batch   aggregate decode tokens/s of B sequences decoded together (B in --batch), MemoryFormer's compiled engine
          (B rows of one `DecodeEngine`: prefill of a --prompt-token prompt per row, then --new greedy steps, the
          argmax as `generate` does it) against `llama-batched-bench -npp PROMPT -ntg NEW -npl B` (its S_TG t/s),
          interleaved rounds, medians; the engine's ms per step by phase; ratios to llama.cpp and to our B = 1.
  prompt  prompt processing of a --pp-token prompt at batch 1: the engine's prefill (only the last token's logits)
          against `llama-bench -p PP -n 0`.

    python benchmarks/decode.py --section batch prompt --configs tiny small --precisions int8 --threads 2 \\
        --llama-bench ~/.cache/llama-anchor/llama.cpp/build/bin/llama-bench --gguf-dir ~/.cache/llama-anchor/gguf --save
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from engine_timing import LLAMA, PAIRS, PHASES, mf_model, one_min_load

from memoryformer import inference as inf
from memoryformer.ops import cpu_ext



def add_args(ap) -> None:
    ap.add_argument("--batch", default="1,4,8,16", help="batch: comma-separated numbers of sequences B")
    ap.add_argument("--pp", type=int, default=512, help="prompt: prompt length")


def engine_batch(model, B: int, prompt: int, new: int, seed: int, profile: bool = False) -> dict:
    """Aggregate decode tokens/s (and prefill tokens/s) of B rows; with `profile`, ms per step by phase instead."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (B, prompt), generator=g)
    eng = inf.DecodeEngine(model, batch_size=B, max_seq_len=prompt + new + 1)
    t0 = time.perf_counter()
    logits = eng.prefill(idx)
    t1 = time.perf_counter()
    eng.profile(profile)
    with cpu_ext.torch_serial():  # what generate() does between two steps
        for _ in range(new):
            logits = eng.step(logits.argmax(-1))
    t2 = time.perf_counter()
    if profile:
        t = eng.timings()
        eng.profile(False)
        return {k: 1e3 * t.get(k, 0.0) / new for k in PHASES}
    return {"tg": B * new / (t2 - t1), "pp": B * prompt / (t1 - t0)}


def llama_batched(binary: Path, gguf: Path, B: int, prompt: int, new: int, threads: int) -> dict:
    cmd = [str(binary), "-m", str(gguf), "-c", str(B * (prompt + new) + 64), "-b", "2048", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(new), "-npl", str(B), "-t", str(threads), "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = [json.loads(x) for x in out.splitlines() if x.startswith("{")][-1]
    return {"tg": float(row["speed_tg"]), "pp": float(row["speed_pp"])}


def llama_pp(bench: Path, gguf: Path, pp: int, threads: int) -> float:
    cmd = [str(bench), "-m", str(gguf), "-p", str(pp), "-n", "0", "-t", str(threads), "-r", "1", "-o", "json"]
    return float(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)[0]["avg_ts"])


def _gguf(args, size: str, prec: str) -> Path | None:
    if not args.llama_bench:
        return None
    f = Path(args.gguf_dir) / f"pythia-{PAIRS[size]}-{LLAMA[prec]}.gguf"
    return f if f.is_file() else None


def section_batch(args, lines: list[str], record: dict) -> None:
    batches = [int(b) for b in str(args.batch).split(",")]
    binary = Path(args.llama_bench).with_name("llama-batched-bench") if args.llama_bench else None
    out = record.setdefault("batch", {})
    lines += ["", f"## Batched decode: B sequences, {args.prompt}-token prompts, {args.new} greedy steps "
              f"(aggregate tok/s, median of {args.rounds} interleaved rounds, {args.threads} threads)", ""]
    for size in args.configs:
        for prec in args.precisions:
            model, gguf = mf_model(size, prec), _gguf(args, size, prec)
            ours = {B: [] for B in batches}
            theirs = {B: [] for B in batches}
            loads = []
            for r in range(args.rounds):
                loads.append(one_min_load())
                for B in batches:  # interleaved: ours and llama.cpp's at each B, round after round
                    ours[B].append(engine_batch(model, B, args.prompt, args.new, seed=r))
                    if gguf is not None:
                        theirs[B].append(llama_batched(binary, gguf, B, args.prompt, args.new, args.threads))
            phases = {B: engine_batch(model, B, args.prompt, args.new, seed=99, profile=True) for B in batches}
            med = {B: statistics.median(x["tg"] for x in ours[B]) for B in batches}
            lmed = {B: statistics.median(x["tg"] for x in theirs[B]) for B in batches if theirs[B]}
            name = f"llama.cpp Pythia-{PAIRS[size].upper()} {LLAMA[prec].upper()}"
            lines += [f"### MF-{size} {prec} against {name if gguf else '(no llama.cpp model)'} "
                      f"(load at round starts: {', '.join(f'{x:.2f}' for x in loads)})", "",
                      f"| B | MF-{size} {prec} tok/s | x own B=1 | {name} tok/s | ratio | step ms | "
                      + " | ".join(PHASES) + " |",
                      "|---|---|---|---|---|---|" + "---|" * len(PHASES)]
            for B in batches:
                lt = lmed.get(B)
                ph = phases[B]
                lines.append(f"| {B} | {med[B]:.0f} | {med[B] / med[batches[0]]:.2f}x | "
                             f"{f'{lt:.0f}' if lt else '-'} | {f'{med[B] / lt:.2f}x' if lt else '-'} | "
                             f"{sum(ph.values()):.2f} | " + " | ".join(f"{ph[k]:.2f}" for k in PHASES) + " |")
            lines.append("")
            out[f"{size}-{prec}"] = dict(ours=ours, llama=theirs, phases_ms=phases, loads=loads,
                                         median=med, llama_median=lmed)
            del model


def section_prompt(args, lines: list[str], record: dict) -> None:
    out = record.setdefault("prompt", {})
    lines += ["", f"## Prompt processing: one {args.pp}-token prompt (tok/s, median of {args.rounds} interleaved "
              "rounds; the engine computes only the last token's logits)", "",
              "| model | MF engine tok/s | llama.cpp | llama.cpp tok/s | ratio | load |", "|---|---|---|---|---|---|"]
    for size in args.configs:
        for prec in args.precisions:
            model, gguf = mf_model(size, prec), _gguf(args, size, prec)
            eng = inf.DecodeEngine(model, max_seq_len=args.pp)
            idx = torch.randint(0, model.config.vocab_size, (1, args.pp), generator=torch.Generator().manual_seed(0))
            ours, theirs, load = [], [], one_min_load()
            for _ in range(args.rounds):
                t = time.perf_counter()
                eng.prefill(idx)
                ours.append(args.pp / (time.perf_counter() - t))
                if gguf is not None:
                    theirs.append(llama_pp(Path(args.llama_bench), gguf, args.pp, args.threads))
            m, lm = statistics.median(ours), statistics.median(theirs) if theirs else None
            lines.append(f"| MF-{size} {prec} | {m:.0f} | {LLAMA[prec].upper()} Pythia-{PAIRS[size].upper()} | "
                         f"{f'{lm:.0f}' if lm else '-'} | {f'{m / lm:.2f}x' if lm else '-'} | {load:.2f} |")
            out[f"{size}-{prec}"] = dict(ours=ours, llama=theirs)
            del eng, model
