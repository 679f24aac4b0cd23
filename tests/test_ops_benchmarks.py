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


def test_compare_quality_pairs_seeds_and_needs_agreement(tmp_path, capsys):
    def summary(ppls, ratio, **over):
        per = {str(s): {"memoryformer": {"val_ppl": p}, "ppl_ratio": r} for s, (p, r) in enumerate(zip(ppls, ratio))}
        st = lambda xs: {"mean": sum(xs) / len(xs), "std": 0.1}  # noqa: E731
        return {"mf_overrides": over, "train_overrides": {}, "planned_tokens": 100, "complete_seeds": [0, 1, 2],
                "per_seed": per, "stats": {"mf_ppl": st(ppls), "ratio": st(ratio)}}

    cq = _load("compare_quality")
    base = summary([100.0, 102.0, 98.0], [1.0, 1.01, 0.99])
    clear = summary([90.0, 91.5, 88.5], [0.9, 0.91, 0.89], weighting="paper")  # every seed ~10 lower
    mixed = summary([99.0, 103.0, 97.5], [0.99, 1.02, 0.98], weighting="x")  # signs disagree
    assert cq.paired(base, clear, "mf")["verdict"] == "better"
    assert cq.paired(clear, base, "mf")["verdict"] == "worse"
    assert cq.paired(base, mixed, "mf")["verdict"] == "within the seed spread"
    paths = []
    for name, s in (("b", base), ("c", clear), ("m", mixed)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(__import__("json").dumps(s))
    text = cq.main([str(p) for p in paths])
    assert "| weighting=paper |" in text and "| better |" in text and "within the seed spread" in text


def test_table_options_reads_finished_runs_by_their_folder_names(tmp_path, capsys):
    import json
    import math

    def run(name, val_ppl, steps=245):
        d = tmp_path / "seed0" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"steps": steps, "total_steps": 245}))
        recs = [{"step": 244, "tokens_per_s": 600.0},
                {"step": steps, "tokens": steps * 4096, "tokens_per_s": 650.0, "val_loss": math.log(val_ppl)}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    run("micro-memoryformer-weighting=release", 350.0)
    run("micro-memoryformer-weighting=release-table_optim=rowwise-table_dtype=bfloat16", 385.0)
    run("micro-memoryformer-weighting=release-table_optim=rowwise", 360.0, steps=122)  # unfinished: left out
    run("micro-memoryformer", 999.0)  # another weighting's reference: not read with --mf-set
    out = _load("table_options").main(["--runs", str(tmp_path), "--seeds", "0", "--mf-set", "weighting=release",
                                       "--results", str(tmp_path)])
    opts = out["options"]
    assert opts["adamw"]["val_ppl"] == {0: 350.0}
    assert opts["-table_optim=rowwise-table_dtype=bfloat16"]["ratio_mean"] == pytest.approx(1.1)
    assert opts["-table_optim=rowwise"]["seeds"] == []
    # MF-base on one 80 GB GPU: the faithful recipe does not fit, the row-wise rule with bf16 tables does
    assert opts["adamw"]["base_fits"] is False and opts["adamw"]["base_state_gb"] > 100
    assert opts["-table_optim=rowwise-table_dtype=bfloat16"]["base_fits"] is True
    assert opts["-table_optim=rowwise-table_dtype=bfloat16"]["base_state_gb"] < 60
    assert "-table_optim=partial-rowwise-adam-table_dtype=bfloat16" in opts
    assert "weighting=release" in (tmp_path / "table_options_micro.md").read_text().splitlines()[0]
    with pytest.raises(SystemExit):
        _load("table_options").main(["--runs", str(tmp_path), "--mf-set", "weighting"])
    assert "--mf-set: expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="no C++ compiler")
def test_decode_script(tmp_path, capsys):
    pytest.importorskip("transformers")
    _load("decode").main(["--section", "decode", "--configs", "tiny", "--precisions", "int8", "--rounds", "1",
                          "--new", "3", "--prompt", "4", "--no-eager", "--threads", "1",
                          "--out", str(tmp_path / "d.md")])
    out = capsys.readouterr().out
    assert "| mf-tiny-int8-engine | int8 |" in out and "Where an engine decode step goes" in out
    rec = __import__("json").loads((tmp_path / "d.json").read_text())
    phases = rec["decode"]["phases_ms"]["mf-tiny-int8-engine"]
    assert phases["total"] > 0 and phases["head"] > 0 and (tmp_path / "d.md").is_file()


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="no C++ compiler")
def test_pool_script(capsys):
    rows = _load("pool").main(["--configs", "micro", "--rounds", "1", "--new", "3", "--prompt", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert "pool / aten" in out and "mf-micro-int8" in out and rows


@pytest.mark.slow
def test_soak_script(tmp_path, capsys):
    res = _load("soak").main(["--steps", "24", "--ckpt-every", "6", "--keep", "2", "--sample-every", "2",
                              "--out", str(tmp_path)])
    assert res["complete"] and res["steps"] == 24 and res["checkpoints_written"] == 4
    assert res["disk_ok"] and res["leftover_temporaries"] == [] and res["rss_late_mb"] > 0
    kept = [k for k in res["kept"] if k.startswith("ckpt-")]
    assert len(kept) == 2 and "final" in res["kept"]
    assert "24 of 24 steps" in capsys.readouterr().out
