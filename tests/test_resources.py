"""Size checks before allocation: an estimate above the memory available is one line with both numbers."""

import pytest
from helpers import tiny_config as tiny_cfg

import memoryformer as mf
from memoryformer import resources
from memoryformer.train import TrainConfig, train


def test_available_bytes_reads_the_machine():
    have = resources.available_bytes("cpu")
    assert have is None or 0 < have < 1 << 50


def test_check_fits_names_what_and_both_numbers(monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 2_000_000_000)
    monkeypatch.delenv(resources.FORCE_ENV, raising=False)
    resources.check_fits(1.9e9, "a thing")  # fits: nothing said
    with pytest.raises(mf.MemoryFormerError, match=r"a thing needs about 3.00 GB, more than the 2.00 GB of memory"):
        resources.check_fits(3e9, "a thing")
    resources.check_fits(3e9, "a thing", force=True)
    monkeypatch.setenv(resources.FORCE_ENV, "1")
    resources.check_fits(3e9, "a thing")


def test_training_too_large_for_memory_stops_before_allocating(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 10_000_000)  # 10 MB
    monkeypatch.delenv(resources.FORCE_ENV, raising=False)
    t = TrainConfig(data=str(corpus), out=str(tmp_path / "r"), batch_size=2, seq_len=16, max_steps=1, eval_every=0,
                    eval_tokens=64, progress=False, verbose=False, cache_dir=str(corpus / "cache"))
    with pytest.raises(mf.MemoryFormerError, match=r"training memoryformer 1x32 .* needs about .* GB, more than the "
                                                   r"0.01 GB of memory available; .*--force-memory"):
        train(tiny_cfg(), t)
    assert not (tmp_path / "r").exists()  # nothing written
    s = train(tiny_cfg(), t.replace(force_memory=True))
    assert s["steps"] == 1


def test_loading_and_the_engine_check_memory_before_allocating(tmp_path, monkeypatch):
    from helpers import tiny_model

    from memoryformer.checkpoint.weights import load_bytes
    from memoryformer.inference import DecodeEngine

    mf.save_model(tiny_model(), tmp_path / "m")
    n = sum(t.numel() for t in tiny_model().state_dict().values() if t.is_floating_point())
    assert load_bytes(tmp_path / "m", None, None) >= 8 * n * 0.9  # read + copied in, float32
    assert load_bytes(tmp_path / "m", "int8", "int8") < load_bytes(tmp_path / "m", None, None) / 4
    monkeypatch.delenv(resources.FORCE_ENV, raising=False)
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 1000)
    with pytest.raises(mf.MemoryFormerError, match=r"loading .*m needs about .* GB, more than the 0.00 GB"):
        mf.load(tmp_path / "m")
    monkeypatch.setenv(resources.FORCE_ENV, "1")
    model = mf.load(tmp_path / "m", tables="int8")
    monkeypatch.delenv(resources.FORCE_ENV)
    with pytest.raises(mf.MemoryFormerError, match=r"the decode engine's KV cache \(4 rows x 32 positions\) needs"):
        DecodeEngine(model, batch_size=4)
