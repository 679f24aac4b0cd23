"""Writes stay inside what the user named: no write through a symbolic link, no output over an input, append-only
logs that survive a torn tail, and a resumed run that logs what an uninterrupted one logs."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config as tiny_cfg

import memoryformer as mf
from memoryformer.integrity import RunLock, append_line, check_apart, read_jsonl, replace_file
from memoryformer.train import TrainConfig, resume_config, train

WALL_CLOCK = ("tokens_per_s", "elapsed_s")


def tcfg(corpus, out, **kw):
    base = dict(data=str(corpus), out=str(out), batch_size=4, seq_len=32, max_steps=8, eval_every=0,
                eval_tokens=256, log_every=4, ckpt_every=3, keep_checkpoints=None, deterministic=True,
                progress=False, verbose=False, cache_dir=str(corpus / "cache"))
    return TrainConfig(**{**base, **kw})


def metrics_lines(run) -> list[str]:
    """metrics.jsonl with its wall-clock fields removed, as text (byte comparison of everything else)."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [json.dumps({k: v for k, v in r.items() if k not in WALL_CLOCK}) for r in recs]


def test_resumed_run_logs_the_same_lines_as_an_uninterrupted_one(corpus, tmp_path):
    a = tmp_path / "a"
    train(tiny_cfg(), tcfg(corpus, a))
    b = tmp_path / "b"
    shutil.copytree(a, b)  # a crash after step 6: its newest checkpoint is ckpt-6, final and summary never written
    shutil.rmtree(b / "final")
    (b / "summary.json").unlink()
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 9.1')  # ... and it died appending a line
    train(None, resume_config(b)[1], resume=b)
    lines = metrics_lines(a)
    assert [json.loads(x)["step"] for x in lines] == [1, 4, 8]  # step 8 averages steps 5-8, across the resume
    assert metrics_lines(b) == lines


def test_read_jsonl_drops_a_torn_tail(tmp_path, caplog):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="memoryformer"):
        assert read_jsonl(p) == [{"step": 1}, {"step": 2}]
    assert "torn last line" in caplog.text and p.read_text().endswith('"lo')  # read only: not changed
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # damage in the middle is no torn tail
    with pytest.raises(mf.MemoryFormerError, match=r"m.jsonl:2: not a JSON object"):
        read_jsonl(p)


@pytest.mark.parametrize("name", ["config.json", ".lock", "metrics.jsonl", "summary.json", "final"])
def test_a_link_inside_a_run_folder_is_refused_not_followed(corpus, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / name)
    with pytest.raises(mf.MemoryFormerError, match="symbolic link"):
        train(tiny_cfg(), tcfg(corpus, run, max_steps=2, ckpt_every=0))
    assert victim.read_text() == "precious\n"


def test_write_helpers_refuse_links(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "out.json")
    with pytest.raises(mf.MemoryFormerError, match="out.json is a symbolic link"):
        replace_file(tmp_path / "out.json", lambda p: p.write_text("x"))
    with pytest.raises(mf.MemoryFormerError, match="symbolic link"):
        append_line(tmp_path / "out.json", "x")
    os.symlink(victim, tmp_path / f".f.json.{os.getpid()}.tmp")  # a planted temporary is removed, not followed
    replace_file(tmp_path / "f.json", lambda p: p.write_text("new"))
    assert (tmp_path / "f.json").read_text() == "new" and victim.read_text() == "precious\n"
    (tmp_path / "lockdir").mkdir()
    os.symlink(victim, tmp_path / "lockdir" / ".lock")
    with pytest.raises(mf.MemoryFormerError, match="symbolic link"):
        with RunLock(tmp_path / "lockdir"):
            pass
    assert victim.read_text() == "precious\n"


def test_check_apart_refuses_an_output_over_its_input(tmp_path):
    ck = tmp_path / "run" / "final"
    ck.mkdir(parents=True)
    for out, rel in ((ck, "is"), (tmp_path / "run", "contains"), (ck / "int8", "lies inside"),
                     (tmp_path / "run" / "." / "final" / ".." / "final", "is")):
        with pytest.raises(mf.MemoryFormerError, match=f"{rel} the input --checkpoint"):
            check_apart(out, {"--checkpoint": ck})
    os.symlink(ck, tmp_path / "alias")
    with pytest.raises(mf.MemoryFormerError, match="is the input"):
        check_apart(tmp_path / "alias", {"--checkpoint": ck})
    check_apart(tmp_path / "run" / "final-int8", {"--checkpoint": ck})  # a sibling is fine


def test_two_saves_of_the_same_model_are_the_same_bytes(tmp_path):
    import subprocess
    import sys

    code = ("import torch, memoryformer as mf, sys; from helpers import tiny_model; "
            "m = mf.freeze(tiny_model(), tables='int8'); mf.save_model(m, sys.argv[1])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    for d in ("a", "b"):  # separate processes: the header's metadata order was per-process before
        subprocess.run([sys.executable, "-c", code, str(tmp_path / d)], check=True, env=env)
    for name in ("model.safetensors", "config.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_tensor_of_the_wrong_dtype_is_refused_even_without_verify(tmp_path):
    from helpers import tiny_model
    from safetensors.torch import load_file, save_file

    mf.save_model(tiny_model(), tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    state["blocks.0.attn.qkv.tables"] = state["blocks.0.attn.qkv.tables"].to(torch.int32)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(mf.MemoryFormerError, match=r"'blocks.0.attn.qkv.tables' is int32, but the model keeps it as "
                                                   r"float32"):
        mf.load(tmp_path / "m", verify=False)


def test_figures_and_reports_never_write_through_a_link(tmp_path, capsys):
    from memoryformer.cli import main as cli_main

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "fig.png")
    with pytest.raises(SystemExit) as e:
        cli_main(["flops", "--plot", str(tmp_path / "fig.png")])
    assert e.value.code == 2 and "fig.png is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"
    cli_main(["flops", "--plot", str(tmp_path / "real.png")])
    assert (tmp_path / "real.png").read_bytes()[:4] == b"\x89PNG"  # the format from the name, not the temporary's
