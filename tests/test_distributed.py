"""torchrun with 2 CPU ranks (gloo): both ranks end with the same parameters, equal to a 1-process run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import memoryformer as mf
from memoryformer.train import TrainConfig, train

MODEL = ["n_layer=1", "d_model=32", "n_head=2", "max_seq_len=32"]


def launch(*cli_args):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "memoryformer", "train", *cli_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def torchrun(corpus, out, *extra):
    return launch(
        "--config", "micro", *[a for kv in MODEL for a in ("--set", kv)],
        "--data", str(corpus), "--cache-dir", str(corpus / "cache"), "--batch-size", "4", "--seq-len", "32",
        "--max-steps", "4", "--eval-every", "2", "--eval-tokens", "256", "--ckpt-every", "2", "--device", "cpu",
        "--deterministic", "--no-progress", "--out", str(out), *extra,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_agree_with_each_other_and_with_one_process(corpus, tmp_path, mode):
    out = tmp_path / mode
    torchrun(corpus, out, *(["--fsdp"] if mode == "fsdp" else []))
    summary = json.loads((out / "summary.json").read_text())
    sums = summary["rank_checksums"]
    assert len(sums) == (2 if mode == "ddp" else 1) and len(set(sums)) == 1
    assert json.loads((out / "final" / "trainer.json").read_text())["world_size"] == 2

    cfg = mf.get_config("micro", n_layer=1, d_model=32, n_head=2, max_seq_len=32)
    single = tmp_path / "single"
    train(cfg, TrainConfig(data=str(corpus), cache_dir=str(corpus / "cache"), out=str(single), batch_size=4,
                           micro_batch_size=2, seq_len=32, max_steps=4, eval_every=2, eval_tokens=256,
                           ckpt_every=2, device="cpu", deterministic=True, progress=False, verbose=False))
    a, b = load_file(out / "final/model.safetensors"), load_file(single / "final/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=3e-4) for k in a)
    la = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)
    assert la[-1]["val_loss"] == pytest.approx(lb[-1]["val_loss"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_rank_checkpoints_resume_exactly(corpus, tmp_path, mode):
    """Pausing a 2-rank run at step 2 and resuming it ends where the uninterrupted 2-rank run ends."""
    flags = ["--fsdp"] if mode == "fsdp" else []
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    torchrun(corpus, straight, *flags)
    torchrun(corpus, paused, *flags, "--stop-after", "2")
    assert (paused / "ckpt-2").is_dir() and not (paused / "final").exists()
    if mode == "fsdp":
        launch("--resume", str(paused), "--no-progress")  # sharded optimizer state restored on 2 ranks
    else:
        from memoryformer.train import resume_config

        cfg, t, _ = resume_config(paused)  # a DDP checkpoint is an ordinary one: one process continues it
        train(cfg, t.replace(progress=False, verbose=False), resume=paused)
    a, b = load_file(straight / "final/model.safetensors"), load_file(paused / "final/model.safetensors")
    if mode == "fsdp":
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert all(torch.allclose(a[k], b[k], atol=3e-4) for k in a)
