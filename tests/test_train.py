"""Trainer: the recipe's schedule and LRs, config files, metrics, checkpoints, bit-identical resume, bad input."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tiny_config as tiny_cfg
from safetensors.torch import load_file

import memoryformer as mf
from memoryformer.cli import main as cli_main
from memoryformer.train import TrainConfig, default_lr, load_run_config, lr_at, resume_config, train


def tcfg(corpus, out, **kw):
    base = dict(data=str(corpus), out=str(out), batch_size=4, seq_len=32, max_steps=6, eval_every=3,
                eval_tokens=256, log_every=1, ckpt_every=0, deterministic=True, progress=False, verbose=False,
                cache_dir=str(corpus / "cache"))
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warmup_cosine_floor():
    total, peak = 1000, 3e-3
    lrs = [lr_at(s, total, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)  # 1 % warmup = 10 steps
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1 * peak, rel=1e-3)
    assert lr_at(505, total, peak) == pytest.approx(peak * (0.1 + 0.9 * 0.5), rel=1e-6)  # half-way down


def test_default_lr_is_three_times_pythia_for_memoryformer():
    assert default_lr(mf.get_config("tiny")) == pytest.approx(3e-3)
    assert default_lr(mf.get_config("pythia-70m")) == pytest.approx(1e-3)
    assert default_lr(mf.get_config("micro")) == pytest.approx(3e-3)
    assert default_lr(mf.get_config("micro-dense")) == pytest.approx(1e-3)
    assert default_lr(mf.get_config("pythia-160m")) == pytest.approx(6e-4)
    assert default_lr(mf.get_config("small")) == pytest.approx(1.8e-3)
    assert default_lr(mf.get_config("pythia-410m")) == pytest.approx(3e-4)


def test_train_config_validation_names_the_field():
    with pytest.raises(mf.ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(mf.ConfigError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(mf.ConfigError, match="unknown training key 'lr_peak'"):
        TrainConfig.from_dict({"lr_peak": 1})
    assert TrainConfig(lr="3e-3").lr == pytest.approx(3e-3)  # YAML 1.1 reads 3e-3 as a string
    assert TrainConfig(max_tokens=5e6).max_tokens == 5_000_000


def test_config_file_preset_overrides_and_train_section(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: micro\nn_layer: 2\ntemperature: 2e0\ntrain:\n  lr: 1e-3\n  batch_size: 8\n")
    cfg, tr = load_run_config(str(f), {"d_model": 64, "n_head": 2})
    assert (cfg.arch, cfg.n_layer, cfg.d_model, cfg.temperature) == ("memoryformer", 2, 64, 2.0)
    assert tr == {"lr": "1e-3", "batch_size": 8}
    for text, key in [("preset: micro\nn_layers: 2\n", "n_layers"), ("preset: huge\n", "preset"),
                      ("train:\n  batch: 2\n", "batch"), ("tau: 7\n", "tau")]:
        f.write_text(text)
        with pytest.raises(mf.ConfigError, match=key):
            load_run_config(str(f))
    f.write_text("preset: [unclosed\n")
    with pytest.raises(mf.ConfigError, match="run.yaml: cannot parse"):
        load_run_config(str(f))
    with pytest.raises(mf.ConfigError, match="neither a preset"):
        load_run_config("no-such-preset")


def test_train_writes_metrics_checkpoints_and_learns(corpus, tmp_path):
    s = train(tiny_cfg(), tcfg(corpus, tmp_path / "run", max_steps=12, eval_every=6, ckpt_every=4, lr=1e-2))
    run = tmp_path / "run"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(r) for r in recs)
    assert [r["step"] for r in recs if "val_loss" in r] == [6, 12]
    assert recs[-1]["tokens"] == 12 * 4 * 32 and s["tokens"] == 12 * 4 * 32
    assert recs[-1]["val_ppl"] == pytest.approx(math.exp(recs[-1]["val_loss"]), rel=1e-4)
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0  # learning: 10.8 -> well below
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["ckpt-4", "ckpt-8", "final"]
    for ck in ("ckpt-4", "final"):
        assert {"model.safetensors", "config.json", "optimizer.safetensors", "rng.safetensors",
                "trainer.json"} <= {p.name for p in (run / ck).iterdir()}
    assert json.loads((run / "final" / "trainer.json").read_text())["step"] == 12
    model = mf.load(run)  # the run folder loads its final model
    assert model.config == tiny_cfg() and s["val_loss"] == pytest.approx(recs[-1]["val_loss"], abs=1e-6)


def test_resume_is_bit_identical_from_a_copied_checkpoint(corpus, tmp_path):
    a = tmp_path / "a"
    train(tiny_cfg(), tcfg(corpus, a, max_steps=6, ckpt_every=3, micro_batch_size=2))
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(a / "ckpt-3", b / "ckpt-3")  # self-contained: resumes from an otherwise empty folder
    cfg, t, path = resume_config(b)
    assert path == b / "ckpt-3" and t.out == str(b)
    train(cfg, t, resume=b)
    for name in ("model.safetensors", "optimizer.safetensors"):
        wa, wb = load_file(a / "final" / name), load_file(b / "final" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # The resumed run's metrics continue from step 4 and match the uninterrupted run's exactly.
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in mb] == [4, 5, 6]
    assert [r["loss"] for r in mb] == [r["loss"] for r in ma[3:]]


def test_resume_in_place_truncates_metrics(corpus, tmp_path):
    run = tmp_path / "r"
    train(tiny_cfg(), tcfg(corpus, run, max_steps=4, stop_after=2))
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["ckpt-2"]
    summary = train(None, resume_config(run)[1], resume=run)
    assert summary["steps"] == 4 and summary["stopped_by"] == "done"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_rejects_contradictions_and_missing_checkpoints(corpus, tmp_path):
    run = tmp_path / "r"
    train(tiny_cfg(), tcfg(corpus, run, max_steps=2))
    with pytest.raises(mf.MemoryFormerError, match=r"batch_size: 8 contradicts the checkpoint's 4"):
        resume_config(run, batch_size=8)
    with pytest.raises(mf.MemoryFormerError, match=r"n_layer: 2 contradicts the checkpoint's 1"):
        resume_config(run, tiny_cfg(n_layer=2))
    with pytest.raises(mf.MemoryFormerError, match="no training checkpoint"):
        resume_config(tmp_path)
    # A new run into a folder that holds one is refused rather than mixed with it.
    with pytest.raises(mf.MemoryFormerError, match="already holds a training run"):
        train(tiny_cfg(), tcfg(corpus, run, max_steps=2))


def test_resume_compares_only_the_fields_the_model_uses(corpus, tmp_path):
    # a dense control trained when the default weighting was "release" resumes under today's default: the weighting
    # (as every memory field) means nothing to it; a MemoryFormer run is still held to its own weighting
    dense = tmp_path / "dense"
    train(tiny_cfg("transformer", weighting="release"), tcfg(corpus, dense, max_steps=2))
    saved, _, _ = resume_config(dense, tiny_cfg("transformer", weighting="paper", tau=4))
    assert saved.weighting == "release"
    with pytest.raises(mf.MemoryFormerError, match=r"n_layer: 2 contradicts the checkpoint's 1"):
        resume_config(dense, tiny_cfg("transformer", n_layer=2))
    with pytest.raises(mf.MemoryFormerError, match=r"arch: 'memoryformer' contradicts the checkpoint's 'transformer'"):
        resume_config(dense, tiny_cfg(weighting="release"))
    run = tmp_path / "mf"
    train(tiny_cfg(weighting="release"), tcfg(corpus, run, max_steps=2))
    with pytest.raises(mf.MemoryFormerError, match=r"weighting: 'paper' contradicts the checkpoint's 'release'"):
        resume_config(run, tiny_cfg(weighting="paper"))
    saved, _, _ = resume_config(run, tiny_cfg(weighting="release", ffn_mult=2))  # the dense FFN width: ignored
    assert saved.ffn_mult == tiny_cfg().ffn_mult


def test_seq_len_beyond_the_model_and_vocab_too_small(corpus, tmp_path):
    with pytest.raises(mf.ConfigError, match="seq_len: 64 exceeds the model's max_seq_len=32"):
        train(tiny_cfg(), tcfg(corpus, tmp_path / "x", seq_len=64))
    with pytest.raises(mf.ConfigError, match="vocab_size"):
        train(tiny_cfg(vocab_size=1000), tcfg(corpus, tmp_path / "y"))
    assert not (tmp_path / "x").exists()


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    s1 = train(tiny_cfg(), tcfg(corpus, tmp_path / "m4", max_steps=3, micro_batch_size=4))
    s2 = train(tiny_cfg(), tcfg(corpus, tmp_path / "m1", max_steps=3, micro_batch_size=1))
    w1, w2 = load_file(tmp_path / "m4/final/model.safetensors"), load_file(tmp_path / "m1/final/model.safetensors")
    # Adam turns float-rounding differences of near-zero gradients into ~lr-sized steps: compare loosely.
    assert all(torch.allclose(w1[k], w2[k], atol=3e-4) for k in w1)
    l1, l2 = ([json.loads(x)["loss"] for x in (tmp_path / m / "metrics.jsonl").read_text().splitlines()] for m in ("m4", "m1"))
    assert l1 == pytest.approx(l2, abs=1e-5)
    assert s1["val_loss"] == pytest.approx(s2["val_loss"], abs=1e-4)


def test_exclude_tables_from_weight_decay(corpus, tmp_path):
    s = train(tiny_cfg(), tcfg(corpus, tmp_path / "wd", max_steps=2, exclude_tables_from_wd=True, lr=1e-2))
    assert s["steps"] == 2
    groups = json.loads((tmp_path / "wd/final/trainer.json").read_text())["optimizer"]["param_groups"]
    wd = {g["name"]: g["weight_decay"] for g in groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0, "tables": 0.0}


def test_cli_errors_are_one_line_and_exit_2(corpus, tmp_path, capsys):
    cases = [
        (["train", "--config", "nope", "--out", str(tmp_path / "o")], "neither a preset"),
        (["train", "--resume", str(tmp_path / "none")], "no such folder"),
        (["train", "--config", "micro", "--set", "tau=7", "--out", str(tmp_path / "o")], "tau"),
        (["train", "--config", "micro", "--set", "n_heads=4", "--out", str(tmp_path / "o")], "n_heads"),
        (["train", "--data", str(tmp_path / "missing.jsonl"), "--max-steps", "1", "--out", str(tmp_path / "o")],
         "missing.jsonl"),
    ]
    for argv, match in cases:
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and match in err and "\n" not in err and "Traceback" not in err


def test_cli_train_and_resume_with_overrides(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    common = ["--data", str(corpus), "--cache-dir", str(corpus / "cache"), "--batch-size", "4", "--seq-len", "32",
              "--eval-tokens", "256", "--no-progress", "--no-verbose"]
    sets = ["--set", "n_layer=1", "--set", "d_model=32", "--set", "n_head=2", "--set", "max_seq_len=32"]
    cli_main(["train", "--config", "micro", *sets, *common, "--max-steps", "4", "--stop-after", "2", "--out", str(out)])
    assert (out / "ckpt-2").is_dir() and not (out / "final").exists()
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--resume", str(out), "--batch-size", "8"])
    assert e.value.code == 2 and "batch_size" in capsys.readouterr().err
    cli_main(["train", "--resume", str(out)])
    assert json.loads((out / "final" / "trainer.json").read_text())["step"] == 4


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(corpus, tmp_path):
    out = tmp_path / "int"
    argv = [sys.executable, "-m", "memoryformer", "train", "--config", "micro", "--set", "n_layer=1",
            "--set", "d_model=32", "--set", "n_head=2", "--set", "max_seq_len=32", "--data", str(corpus),
            "--cache-dir", str(corpus / "cache"), "--batch-size", "4", "--seq-len", "32", "--max-steps", "100000",
            "--eval-every", "0", "--eval-tokens", "256", "--log-every", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ckpts = [p for p in out.iterdir() if p.name.startswith("ckpt-")]
    assert len(ckpts) == 1 and "Traceback" not in err
    step = json.loads((ckpts[0] / "trainer.json").read_text())["step"]
    assert step >= 1
    cfg, t, _ = resume_config(out, max_steps=step + 2)
    s = train(cfg, t.replace(progress=False, verbose=False), resume=out)
    assert s["steps"] == step + 2


def test_time_budget_alone_sets_the_schedule(corpus, tmp_path):
    s = train(tiny_cfg(), tcfg(corpus, tmp_path / "tb", max_steps=None, time_budget=4.0, eval_every=0))
    assert s["stopped_by"] in ("done", "time_budget") and s["steps"] >= 1 and s["total_steps"] >= 1
    assert (tmp_path / "tb" / "final").is_dir()


def test_missing_tensorboard_fails_before_writing(corpus, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(mf.MemoryFormerError, match="tensorboard"):
        train(tiny_cfg(), tcfg(corpus, tmp_path / "t", tensorboard=True))
    assert not (tmp_path / "t").exists()


def test_diverging_loss_stops_with_a_clear_error(corpus, tmp_path):
    with pytest.raises(mf.MemoryFormerError, match=r"5 consecutive steps \(from step 2\) had a non-finite loss"):
        train(tiny_cfg(), tcfg(corpus, tmp_path / "nan", lr=1e12, max_steps=20, eval_every=0, warmup_frac=0.0))


def test_duration_and_number_flags():
    import argparse

    from memoryformer.cli.args import duration, number

    assert [duration(x) for x in ("600", "90s", "10m", "1.5h")] == [600, 90, 600, 5400]
    assert number(int)("5e6") == 5_000_000
    for bad, fn in (("ten minutes", duration), ("2.5", number(int))):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)
