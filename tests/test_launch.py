"""`memoryformer train --nproc-per-node N`: torchrun's environment for each rank, one clean Ctrl-C for all of them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from memoryformer import launch

MODEL = ["--set", "n_layer=1", "--set", "d_model=32", "--set", "n_head=2", "--set", "max_seq_len=32"]


def test_ranks_get_torchruns_environment_without_the_launcher_flag():
    argv = ["train", "--nproc-per-node", "2", "--config", "micro", "--nproc-per-node=2", "--out", "x"]
    assert launch.strip_flag(argv) == ["train", "--config", "micro", "--out", "x"]
    env = launch.rank_env(1, 2, 29999, base={"PATH": "/bin"})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    assert int(env["OMP_NUM_THREADS"]) >= 1 and env["PATH"] == "/bin"
    assert launch.rank_env(0, 2, 1, base={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"  # a user's choice stays


def _start(corpus, out, *extra):
    cmd = [sys.executable, "-m", "memoryformer", "train", "--nproc-per-node", "2", "--config", "micro", *MODEL,
           "--data", str(corpus), "--cache-dir", str(corpus / "cache"), "--batch-size", "4", "--seq-len", "32",
           "--eval-tokens", "256", "--log-every", "1", "--device", "cpu", "--no-progress", "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_with_one_checkpoint_and_one_line(corpus, tmp_path):
    out = tmp_path / "run"
    proc = _start(corpus, out, "--max-steps", "1000000", "--eval-every", "0", "--ckpt-every", "0")
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.count("stopping after this step") == 1, stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("interrupted at step")]
    step = int(line.split()[3].rstrip(":"))
    trainer = json.loads((out / f"ckpt-{step}" / "trainer.json").read_text())
    assert trainer["step"] == step and trainer["world_size"] == 2 and not (out / "final").exists()


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch_with_its_code(corpus, tmp_path):
    proc = _start(tmp_path / "no-such-corpus", tmp_path / "run", "--max-steps", "2")
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2 and "error:" in stderr and "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "run" / "final")
