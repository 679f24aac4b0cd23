"""Checkpoint directories: atomic writes, training state round trip, finding the newest, loading a run folder."""

import json

import pytest
import torch

import memoryformer as mf
from memoryformer import checkpoint as ck


def tiny():
    return mf.get_config("micro", n_layer=1, d_model=32, n_head=2, vocab_size=64, max_seq_len=16)


def _state(model, opt, step):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return dict(
        model_state=model.state_dict(), model_config=model.config,
        optimizer_state=get_optimizer_state_dict(model, opt), rng_state={"torch_cpu": torch.get_rng_state()},
        trainer_state={"step": step, "train_config": {}},
    )


def _trained():
    torch.manual_seed(0)
    model = mf.build_model(tiny())
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    dest = tmp_path / "ckpt-1"
    with pytest.raises(RuntimeError):
        with ck.atomic_dir(dest) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash while writing")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with ck.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("old")
    with ck.atomic_dir(dest) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-1"]


def test_training_checkpoint_round_trip(tmp_path):
    model, opt = _trained()
    path = ck.save_training_checkpoint(tmp_path / "ckpt-2", **_state(model, opt, 2))
    assert sorted(p.name for p in path.iterdir()) == sorted([*ck.TRAINING_FILES, "manifest.json"])
    got = ck.load_training_checkpoint(path)
    assert got["model_config"] == model.config
    assert all(torch.equal(got["model_state"][k], v) for k, v in model.state_dict().items())
    want = _state(model, opt, 2)["optimizer_state"]
    for name, st in want["state"].items():
        for key, val in st.items():
            assert torch.equal(got["optimizer_state"]["state"][name][key], val)
    # The loaded state drives a fresh optimizer to the same next step.
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    m2 = mf.build_model(tiny())
    m2.load_state_dict(got["model_state"])
    o2 = torch.optim.AdamW(m2.param_groups(0.1), lr=1e-2)
    set_optimizer_state_dict(m2, o2, got["optimizer_state"])
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (m2, o2)):
        m(x, x)[1].backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))


def test_find_newest_and_ignore_partial(tmp_path):
    model, opt = _trained()
    for step in (5, 10):
        ck.save_training_checkpoint(tmp_path / f"ckpt-{step}", **_state(model, opt, step))
    (tmp_path / ".ckpt-15.tmp-123").mkdir()  # a crash mid-write
    (tmp_path / "ckpt-20").mkdir()  # no trainer.json: never resumed from
    assert ck.find_checkpoint(tmp_path).name == "ckpt-10"
    assert ck.find_checkpoint(tmp_path / "ckpt-5").name == "ckpt-5"
    ck.prune_checkpoints(tmp_path, keep=1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [10]
    loaded = mf.load(tmp_path)  # a run folder loads its newest checkpoint
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))


def test_missing_or_damaged_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(mf.MemoryFormerError, match="no such folder"):
        ck.find_checkpoint(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(mf.MemoryFormerError, match="no training checkpoint"):
        ck.find_checkpoint(tmp_path / "run")
    model, opt = _trained()
    p = ck.save_training_checkpoint(tmp_path / "run" / "ckpt-1", **_state(model, opt, 1))
    (p / ck.OPTIMIZER).write_bytes(b"garbage")
    with pytest.raises(mf.MemoryFormerError, match="optimizer.safetensors"):
        ck.load_training_checkpoint(p)
    (p / ck.RNG).unlink()
    with pytest.raises(mf.MemoryFormerError, match="rng.safetensors: missing"):
        ck.load_training_checkpoint(p)


def test_save_model_still_loads(tmp_path):
    model, _ = _trained()
    mf.save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["d_model"] == 32
    loaded = mf.load(tmp_path / "m")
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(loaded(x)[0], model.eval()(x)[0])


@pytest.mark.parametrize("tables", ["int8", "bfloat16"])
def test_inference_tables_save_and_load_as_they_are(tmp_path, tables):
    from memoryformer.layers import MemoryLayer

    model, _ = _trained()
    x = torch.randint(0, 64, (2, 8))
    mf.freeze(model.eval(), tables, head="float32")
    with torch.no_grad():
        want = model(x)[0]
    mf.save_model(model, tmp_path / "q")
    loaded = mf.load(tmp_path / "q")
    layers = [m for m in loaded.modules() if isinstance(m, MemoryLayer)]
    assert layers and all(m.tables.dtype == getattr(torch, tables) and not m.tables.requires_grad for m in layers)
    assert all((m.scale is not None) == (tables == "int8") for m in layers)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], want)
    # the file holds the small tables: int8 (+ one fp32 scale per row) ~ 0.29, bf16 ~ 0.51 of the fp32 file here
    fp32 = mf.save_model(_trained()[0], tmp_path / "f")
    ratio = (tmp_path / "q" / "model.safetensors").stat().st_size / (fp32 / "model.safetensors").stat().st_size
    assert ratio < {"int8": 0.35, "bfloat16": 0.55}[tables]


def test_unknown_inference_tag_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _trained()
    mf.save_model(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    save_file(load_file(f), f, metadata={"format": "pt", ck.INFERENCE_KEY: "int3/float32"})
    with pytest.raises(mf.MemoryFormerError, match="unknown memoryformer.inference_tables 'int3/float32'"):
        mf.load(tmp_path / "m", verify=False)  # the edit also no longer matches the manifest


def test_cli_export_int8_and_refusals(tmp_path, capsys):
    from memoryformer.cli import main as cli_main

    model, _ = _trained()
    mf.save_model(model, tmp_path / "ck")
    cli_main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "q"), "--tables", "int8"])
    assert "tables int8" in capsys.readouterr().out
    loaded = mf.load(tmp_path / "q")
    assert loaded.blocks[0].attn.qkv.tables.dtype == torch.int8
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():  # the same model as converting in memory
        assert torch.equal(loaded(x)[0], mf.freeze(model.eval(), "int8")(x)[0])
    for argv, msg in (([], "exists and is not an empty folder"), (["--hf", "--tables", "int8", "--force"], "drop --tables or --hf")):
        with pytest.raises(SystemExit) as e:
            cli_main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "q"), *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err
