"""Pieces shared by the decode-engine benchmarks (decode.py, pool.py): the load, the bytes a decode step reads (the
bound on tokens/s at a given memory bandwidth), random models in an inference precision, and timed / profiled
engine decodes."""

from __future__ import annotations

import os
import time

import torch

import memoryformer as mf
from memoryformer import inference as inf
from memoryformer.ops import cpu_ext

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
PAIRS = {"tiny": "70m", "small": "160m"}  # MemoryFormer preset -> the Pythia shape it is compared with
LLAMA = {"fp32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_0"}  # llama.cpp's format at each weight precision
ELEM = {"fp32": 4, "bf16": 2, "int8": 1}
PHASES = ("embed", "hash", "gather_qkv", "attention", "norms_residuals", "gather_block_l1", "gather_block_l2", "head")


def one_min_load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def mf_bytes_per_token(cfg: mf.ModelConfig, prec: str, ctx: int) -> dict[str, float]:
    """Table rows hit (+ their int8 scales), head and embedding row, and the keys/values attention reads."""
    e = ELEM[prec]
    K = cfg.n_tables
    per_block = K * (3 * cfg.d_model + cfg.block_hidden) + cfg.block_hidden // (cfg.tau + cfg.expand_bits) * cfg.d_model
    tables = cfg.n_layer * per_block * e + (cfg.n_layer * 3 * K * 4 if prec == "int8" else 0)
    head = cfg.vocab_size * cfg.d_model * e + (cfg.vocab_size * 4 if prec == "int8" else 0)
    kv_elem = 4 if prec == "fp32" else 2
    kv = 2 * cfg.n_layer * ctx * cfg.d_model * kv_elem
    return {"tables": tables, "head": head, "kv": kv, "total": tables + head + kv + cfg.d_model * e}


def dense_bytes_per_token(cfg: mf.ModelConfig, prec: str, ctx: int) -> dict[str, float]:
    """A dense Pythia reads every weight once per token (embedding row aside), plus its f16/fp32 KV cache."""
    d, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    e = {"fp32": 4, "bf16": 2, "int8": 34 / 32}[prec]  # Q8_0: 32 int8 + one f16 scale per block
    weights = L * (4 * d * d + 2 * cfg.ffn_mult * d * d) * e + V * d * e
    kv = 2 * L * ctx * d * (4 if prec == "fp32" else 2)
    return {"weights": weights, "kv": kv, "total": weights + kv}


def mf_model(size: str, prec: str, seed: int = 0):
    """A MemoryFormer preset with random weights built directly in `prec` (tables, head and embedding)."""
    p = PRECISIONS[prec]
    return inf.random_inference_model(mf.get_config(size), tables=p, head=p, seed=seed)


def run_engine(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `new` tokens) through the compiled engine."""
    eng = inf.DecodeEngine(model, max_seq_len=prompt.shape[1] + new + 1)
    t0 = time.perf_counter()
    logits = eng.prefill(prompt)
    t1 = time.perf_counter()
    with cpu_ext.torch_serial():  # as generate(): torch's argmax beside the kernels' pool on one thread
        for _ in range(new):
            logits = eng.step(logits.argmax(-1))
    return t1 - t0, time.perf_counter() - t1


def profile_engine(model, prompt: torch.Tensor, new: int) -> dict[str, float]:
    """Milliseconds per decode step in each phase of the engine (an extra, untimed pass with its profiler on)."""
    eng = inf.DecodeEngine(model, max_seq_len=prompt.shape[1] + new + 1)
    logits = eng.prefill(prompt)
    eng.profile(True)
    with cpu_ext.torch_serial():
        for _ in range(new):
            logits = eng.step(logits.argmax(-1))
    t = eng.timings()
    eng.profile(False)
    return {k: 1e3 * t.get(k, 0.0) / new for k in PHASES}
