"""Tokens as they are produced: `generate.stream`, the CLI printing them at once, Ctrl-C, and ids outside the vocab."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

import memoryformer as mf
from memoryformer.cli import main as cli_main
from memoryformer.generate import generate, stream


def test_stream_yields_what_generate_returns():
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    g = torch.Generator().manual_seed(3)
    want = generate(model, idx, 7, temperature=1.0, generator=g)
    g = torch.Generator().manual_seed(3)
    steps = list(stream(model, idx, 7, temperature=1.0, generator=g))
    assert len(steps) == 7 and all(s.shape == (2, 1) for s in steps)
    assert torch.equal(torch.cat([idx, *steps], 1), want)


def test_ids_and_eos_outside_the_vocab_are_refused_before_the_first_token():
    model = tiny_model()
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"eos_token: expected a token id in \[0, {V}\)"):
        stream(model, torch.tensor([[1, 2]]), 3, eos_token=V)
    with pytest.raises(ValueError, match=rf"idx: token ids must lie in \[0, {V}\).*got {V + 5}"):
        generate(model, torch.tensor([[1, V + 5]]), 3)
    with pytest.raises(ValueError, match="idx: expected integer token ids, got float32"):
        generate(model, torch.tensor([[1.0, 2.0]]), 3)


def test_cli_generate_prints_what_generate_returns(tmp_path, capsys):
    from memoryformer.data import EOT_ID, decode, encode

    model = tiny_model()
    mf.save_model(model, tmp_path / "m")
    cli_main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Once upon", "--max-new-tokens", "12",
              "--seed", "1", "--temperature", "0.8"])
    out = capsys.readouterr().out
    ids = encode("Once upon")
    want = generate(model, torch.tensor([ids]), 12, temperature=0.8, eos_token=EOT_ID,
                    generator=torch.Generator().manual_seed(1))[0, len(ids):].tolist()
    want = want[: want.index(EOT_ID)] if EOT_ID in want else want
    assert out == "Once upon" + decode(want) + "\n"


def test_export_over_its_own_checkpoint_is_refused_even_with_force(tmp_path, capsys):
    mf.save_model(tiny_model(), tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    for out in (tmp_path / "m", tmp_path / "m" / "int8", tmp_path):
        with pytest.raises(SystemExit) as e:
            cli_main(["export", "--checkpoint", str(tmp_path / "m"), "--out", str(out), "--tables", "int8", "--force"])
        assert e.value.code == 2
        assert "the input --checkpoint" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_generation_with_one_line(tmp_path):
    mf.save_model(tiny_model(), tmp_path / "m")
    env = {**os.environ, "MEMORYFORMER_CPU_KERNEL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "memoryformer", "generate", "--checkpoint", str(tmp_path / "m"),
                             "--prompt", "The", "--max-new-tokens", "100000000000", "--no-verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=Path(__file__).parent,
                            preexec_fn=_default_sigint)  # a background job starts with SIGINT ignored
    os.set_blocking(proc.stdout.fileno(), False)
    deadline, got = time.time() + 120, b""
    while time.time() < deadline and len(got) < 20:  # tokens arrive while it runs: it streams
        got += proc.stdout.read() or b""
        time.sleep(0.1)
    assert got.startswith(b"The") and len(got) >= 20
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.decode().strip().splitlines()
    assert "Traceback" not in err.decode() and lines[-1].startswith("memoryformer: interrupted after ")


def test_printed_pieces_add_up_to_the_text_across_split_characters(capsys):
    from memoryformer.cli.inference import _print_as_generated
    from memoryformer.data import decode, encode

    text = " naïve 世界 🎉 Ωmega — done"
    ids = encode(text)
    assert any(decode([i]).endswith("\ufffd") for i in ids)  # 🎉 and Ω span several tokens
    got = _print_as_generated("P:", iter(torch.tensor([[i]]) for i in ids))
    assert got == text and capsys.readouterr().out == "P:" + text + "\n"
