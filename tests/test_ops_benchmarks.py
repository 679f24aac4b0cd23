"""The benchmark scripts run end to end (tiny shapes, CPU), so they still work when a GPU session runs them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernels_script(capsys):
    _load("kernels").main([
        "--device", "cpu", "--dims", "64", "--tokens", "3", "--reps", "1", "--budget", "1",
        "--section", "layer", "latency", "--latency-dim", "64", "--latency-tokens", "1", "--cache", "hot",
        "--latency-reps", "2",
    ])
    out = capsys.readouterr().out
    assert "| 64 | 3 | fwd |" in out and "| 64 | 3 | fwd+bwd |" in out and "| 1 | hot |" in out


def test_block_script(capsys):
    _load("block").main(["--device", "cpu", "--dims", "64", "--batch", "1", "--seq", "8", "--reps", "1",
                         "--budget", "1", "--no-autocast"])
    out = capsys.readouterr().out
    assert "| 64 | fwd |" in out and "| 64 | fwd+bwd |" in out


def test_quantization_script(tmp_path, capsys):
    import memoryformer as mf

    torch.manual_seed(0)
    model = mf.build_model(mf.get_config("micro", n_layer=1, d_model=32, n_head=2, max_seq_len=16, vocab_size=64))
    mf.save_model(model, tmp_path / "ckpt")
    np.save(tmp_path / "val.npy", np.random.default_rng(0).integers(0, 64, 200).astype(np.uint16))
    _load("quantization").main([str(tmp_path / "ckpt"), "--tokens", str(tmp_path / "val.npy"), "--max-tokens", "64"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines() if line.startswith("| ")
            and line.split("|")[1].strip() in ("float32", "bfloat16", "int8")}
    assert set(rows) == {"float32", "bfloat16", "int8"}
    assert rows["int8"] == pytest.approx(rows["float32"], rel=0.01)
