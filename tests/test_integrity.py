"""What is written is whole and finite, and what is read is what was written: manifests, the non-finite guard, the
token cache, resume's fallback, the run-folder lock, temporaries, durable renames, file modes, write failures."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file, save_file

import memoryformer as mf
from memoryformer import checkpoint as ck
from memoryformer import data as data_mod
from memoryformer import integrity
from memoryformer.train import TrainConfig, resume_config, train


def tcfg(corpus, out, **kw):
    base = dict(data=str(corpus), out=str(out), batch_size=2, seq_len=32, max_steps=4, eval_every=0,
                eval_tokens=64, log_every=1, ckpt_every=2, deterministic=True, progress=False, verbose=False,
                cache_dir=str(corpus / "cache"))
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A finished 4-step run with ckpt-2/ and final/ (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    train(tiny_config(), tcfg(corpus, out))
    return out


@pytest.fixture
def run(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def flip_byte(path, offset=-64):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x40
    path.write_bytes(bytes(b))


def rewrite_manifest(folder):
    """Re-record the manifest after a deliberate edit, so the test reaches the check behind it."""
    names = json.loads((folder / integrity.MANIFEST).read_text())["files"]
    integrity.write_manifest(folder, list(names))


# ---------------------------------------------------------------------------------------------------------------
# The non-finite guard


def test_non_finite_step_is_skipped_logged_and_its_data_consumed(corpus, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def nan_on_step_3(params, max_norm, *a, **k):
        calls.append(1)
        norm = real(params, max_norm, *a, **k)
        return torch.full_like(norm, float("nan")) if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_on_step_3)
    out = tmp_path / "skip"
    s = train(tiny_config(), tcfg(corpus, out, max_steps=4, ckpt_every=1))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[2]["skipped"] is True
    assert "non-finite gradient norm (nan)" in recs[2]["reason"] and "loss" not in recs[2]
    assert s["skipped_steps"] == 1 and s["steps"] == 4
    w2, w3 = load_file(out / "ckpt-2" / ck.WEIGHTS), load_file(out / "ckpt-3" / ck.WEIGHTS)
    o2, o3 = load_file(out / "ckpt-2" / ck.OPTIMIZER), load_file(out / "ckpt-3" / ck.OPTIMIZER)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # no parameter update ...
    assert all(torch.equal(o2[k], o3[k]) for k in o2)  # ... and no optimizer state change (Adam's step too)
    t3 = json.loads((out / "ckpt-3" / ck.TRAINER).read_text())
    assert t3["sampler"]["draws"] == 3 and t3["skipped_steps"] == 1  # the skipped step's batch was consumed
    assert not torch.equal(load_file(out / "final" / ck.WEIGHTS)["head.weight"], w3["head.weight"])


def test_diverging_run_never_writes_a_non_finite_checkpoint(corpus, tmp_path):
    out = tmp_path / "lr1e6"
    with pytest.raises(mf.MemoryFormerError, match=r"(non-finite|not written)"):
        train(tiny_config(), tcfg(corpus, out, lr=1e6, max_steps=30, ckpt_every=1, warmup_frac=0.0))
    found = ck.list_checkpoints(out)
    assert found  # the steps before the divergence were saved ...
    for _, p in found:  # ... and each of them is finite and loads
        ck.load_training_checkpoint(p)
    assert ck.find_resumable(out) == found[-1][1]


def test_max_skipped_steps_names_the_step(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, *a, **k: torch.tensor(float("inf")))
    with pytest.raises(mf.MemoryFormerError, match=r"step 2: 2 consecutive steps \(from step 1\).*"
                                                   r"--max-skipped-steps 2.*no checkpoint was written"):
        train(tiny_config(), tcfg(corpus, tmp_path / "inf", max_skipped_steps=2, max_steps=10))


def test_save_refuses_non_finite_tensors_and_leaves_nothing(tmp_path):
    model = mf.build_model(tiny_config())
    state = model.state_dict()
    state["blocks.0.attn.qkv.bias"] = state["blocks.0.attn.qkv.bias"].clone()
    state["blocks.0.attn.qkv.bias"][3] = float("inf")
    kw = dict(model_config=model.config, optimizer_state={"state": {}, "param_groups": []},
              rng_state={"torch_cpu": torch.get_rng_state()}, trainer_state={"step": 1, "train_config": {}})
    with pytest.raises(integrity.IntegrityError, match=r"ckpt-1: not written: the model: tensor "
                                                       r"'blocks.0.attn.qkv.bias' holds 1 non-finite value"):
        ck.save_training_checkpoint(tmp_path / "ckpt-1", model_state=state, **kw)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(integrity.IntegrityError, match="'head.weight' holds 1 non-finite"):
        mf.save_model(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "m"]) and not list((tmp_path / "m").glob("*.safetensors"))


def test_resume_skips_a_checkpoint_holding_nan(run, caplog):
    final = run / "final"
    w = load_file(final / ck.WEIGHTS)
    w["norm.weight"][0] = float("nan")
    save_file(w, final / ck.WEIGHTS, metadata={"format": "pt", ck.MANIFEST_KEY: "1"})
    rewrite_manifest(final)  # the file is "intact", it just holds a NaN (as an older version could have written)
    assert ck.find_resumable(run) == run / "ckpt-2"
    assert "skipping" in caplog.text and "'norm.weight' holds 1 non-finite" in caplog.text
    with pytest.raises(mf.MemoryFormerError, match="non-finite"):
        mf.load(final)


# ---------------------------------------------------------------------------------------------------------------
# Manifests and cross-checks


def test_manifest_records_every_file(run):
    files = json.loads((run / "final" / integrity.MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(ck.TRAINING_FILES)
    for name, entry in files.items():
        assert entry["sha256"] == integrity.sha256_file(run / "final" / name)


@pytest.mark.parametrize("name", [ck.WEIGHTS, ck.OPTIMIZER, ck.RNG, ck.TRAINER, ck.CONFIG])
def test_a_flipped_byte_in_any_file_is_named(run, name):
    flip_byte(run / "final" / name, offset=-3)
    with pytest.raises(integrity.IntegrityError, match=f"final/{name}: SHA-256 differs from manifest.json"):
        ck.load_training_checkpoint(run / "final")


def test_flipped_weight_byte_refuses_load_and_no_verify_loads(run):
    flip_byte(run / "final" / ck.WEIGHTS)
    with pytest.raises(integrity.IntegrityError, match="model.safetensors: SHA-256 differs"):
        mf.load(run / "final")
    assert mf.load(run / "final", verify=False).config == tiny_config()


def test_truncated_file_and_missing_manifest(run):
    w = run / "final" / ck.WEIGHTS
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(integrity.IntegrityError, match=r"bytes, but manifest.json recorded .* \(truncated"):
        mf.load(run / "final")
    (run / "ckpt-2" / integrity.MANIFEST).unlink()  # the weights' metadata says one was written
    with pytest.raises(integrity.IntegrityError, match="manifest.json: missing, though the checkpoint's writer"):
        mf.load(run / "ckpt-2")


@pytest.mark.parametrize("old,new,why", [
    ('"weighting": "paper"', '"weighting": "release"', "464 bytes, but manifest.json recorded 462"),
    ('"rotary_pct": 0.25', '"rotary_pct": 0.50', "SHA-256 differs from manifest.json"),
    ('"temperature": 1.0', '"temperature": NaN', "SHA-256 differs from manifest.json"),
])
def test_edited_semantic_config_field_is_caught(run, old, new, why):
    """Shapes cannot tell the weighting or the rotary fraction; the manifest can."""
    cfg = run / "final" / ck.CONFIG
    assert old in cfg.read_text()
    cfg.write_text(cfg.read_text().replace(old, new))
    with pytest.raises(integrity.IntegrityError, match=f"config.json: .*{why}"):
        mf.load(run / "final")


@pytest.mark.parametrize("field,value,named", [
    ("d_model", 64, "d_model=64"), ("n_layer", 2, "n_layer=2"), ("tau", 4, "tau=4"),
    ("expand_bits", 1, "expand_bits=1"), ("vocab_size", 50400, "vocab_size=50400"),
    ("memory_bias", False, "memory_bias=False"), ("hash_projection", True, "hash_projection=True"),
    ("arch", "transformer", "arch='transformer'"),
])
def test_config_contradicting_the_tensors_names_the_field(tmp_path, field, value, named):
    mf.save_model(mf.build_model(tiny_config()), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / ck.CONFIG).read_text())
    cfg[field] = value
    (tmp_path / "m" / ck.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match=f"config.json: {named} does not match model.safetensors"):
        mf.load(tmp_path / "m", verify=False)


def test_infer_config_fields_of_the_dense_control_and_linformer():
    model = mf.build_model(tiny_config("transformer", attention="linformer", linformer_k=4, ffn_mult=2))
    got = ck.infer_config_fields({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert got == dict(vocab_size=50304, d_model=32, n_layer=1, arch="transformer", ffn_mult=2,
                       attention="linformer", linformer_k=4, max_seq_len=32)


# ---------------------------------------------------------------------------------------------------------------
# Resume: which checkpoint, which paths


def test_resume_falls_back_past_a_truncated_newest_checkpoint(run, caplog):
    opt = run / "final" / ck.OPTIMIZER
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    cfg, t, path = resume_config(run, max_steps=6)
    assert path == run / "ckpt-2" and "skipping" in caplog.text and "final/optimizer.safetensors" in caplog.text
    with pytest.raises(integrity.IntegrityError, match="optimizer.safetensors"):
        resume_config(run / "final")  # a checkpoint named explicitly is never swapped for another


def test_resume_with_nothing_intact_says_so(run):
    for p in ("ckpt-2", "final"):
        flip_byte(run / p / ck.RNG, offset=-2)
    with pytest.raises(ck.CheckpointError, match="none of its 2 checkpoint"):
        resume_config(run)


def test_stored_cache_dir_is_never_obeyed_and_relative_data_refused(run, tmp_path):
    trainer = run / "final" / ck.TRAINER
    state = json.loads(trainer.read_text())
    state["train_config"]["cache_dir"] = str(tmp_path / "elsewhere" / ".." / ".." / "escape")
    trainer.write_text(json.dumps(state))
    rewrite_manifest(run / "final")
    _, t, _ = resume_config(run / "final")
    assert t.cache_dir is None  # the user's --cache-dir, or the default, never the stored one
    _, t, _ = resume_config(run / "final", cache_dir=str(tmp_path / "mine"))
    assert t.cache_dir == str(tmp_path / "mine")
    state["train_config"]["data"] = "../../etc/corpus"
    trainer.write_text(json.dumps(state))
    rewrite_manifest(run / "final")
    with pytest.raises(ck.CheckpointError, match=r"data '../../etc/corpus' is not an absolute path.*--data again"):
        resume_config(run / "final")


def test_resume_refuses_data_whose_tokens_changed(run, corpus):
    trainer = run / "final" / ck.TRAINER
    state = json.loads(trainer.read_text())
    assert set(state["data"]) == {"train", "val"}
    state["data"]["train"] = "0" * 32 + state["data"]["train"][32:]
    trainer.write_text(json.dumps(state))
    rewrite_manifest(run / "final")
    cfg, t, path = resume_config(run / "final", max_steps=5, cache_dir=str(corpus / "cache"))
    with pytest.raises(data_mod.DataError, match="are not the ones .* was trained on"):
        train(cfg, t, resume=path)


# ---------------------------------------------------------------------------------------------------------------
# The token cache


def _corpus_copy(corpus, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(corpus / "toy.train.jsonl", d / "toy.train.jsonl")
    shutil.copy(corpus / "toy.val.jsonl", d / "toy.val.jsonl")
    return d


def test_damaged_token_cache_is_rebuilt(corpus, tmp_path, caplog):
    d, cache = _corpus_copy(corpus, tmp_path), tmp_path / "cache"
    want = np.array(data_mod.load_tokens(str(d), "train", cache_dir=cache))
    (binfile,) = cache.glob("tokens-*.bin")
    raw = bytearray(binfile.read_bytes())
    raw[10] ^= 0x01  # one token id changed
    binfile.write_bytes(bytes(raw))
    got = np.array(data_mod.load_tokens(str(d), "train", cache_dir=cache))
    assert "does not match its recorded SHA-256" in caplog.text and np.array_equal(got, want)


def test_in_place_edit_keeping_size_and_mtime_is_seen(corpus, tmp_path):
    d, cache = _corpus_copy(corpus, tmp_path), tmp_path / "cache"
    src = d / "toy.val.jsonl"
    before = np.array(data_mod.load_tokens(str(d), "val", cache_dir=cache))
    st = src.stat()
    text = src.read_text()
    i = text.index(" the ")
    src.write_text(text[:i] + " and " + text[i + 5 :])  # same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert src.stat().st_size == st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
    after = np.array(data_mod.load_tokens(str(d), "val", cache_dir=cache))
    assert not np.array_equal(before, after) and len(list(cache.glob("tokens-*.bin"))) == 2


def test_cache_is_keyed_by_content_not_path(corpus, tmp_path):
    cache = tmp_path / "cache"
    a = data_mod.token_split(str(corpus / "toy.val.jsonl"), "train", cache_dir=cache)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(corpus / "toy.val.jsonl", moved)
    b = data_mod.token_split(str(moved), "train", cache_dir=cache)
    assert a[1] == b[1] and len(list(cache.glob("tokens-*.bin"))) == 1


# ---------------------------------------------------------------------------------------------------------------
# Run folders: one writer, no leftovers, durable and readable files


def test_second_writer_of_a_run_folder_gets_one_line(run, corpus):
    with integrity.RunLock(run):
        cfg, t, path = resume_config(run, max_steps=6, cache_dir=str(corpus / "cache"))
        with pytest.raises(mf.MemoryFormerError, match=rf"another memoryformer process \(pid {os.getpid()}\)"):
            train(cfg, t, resume=path)
    assert (run / "final").is_dir() and not (run / "ckpt-4").exists()  # nothing was written into it


def test_stale_temporaries_are_removed_when_a_run_starts(run, corpus, caplog):
    junk = [run / ".ckpt-6.tmp-4242", run / ".final.old-77"]
    for j in junk:
        j.mkdir()
        (j / ck.WEIGHTS).write_bytes(b"x" * 1000)
    (run / ".metrics.jsonl.99.tmp").write_text("partial")
    (run / "notes.txt").write_text("mine")  # not ours: kept
    cfg, t, path = resume_config(run, max_steps=5, cache_dir=str(corpus / "cache"))
    train(cfg, t, resume=path)
    assert not any(j.exists() for j in junk) and not (run / ".metrics.jsonl.99.tmp").exists()
    assert (run / "notes.txt").exists() and "removed 3 temporary" in caplog.text


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = integrity.fsync_path, os.replace
    monkeypatch.setattr(integrity, "fsync_path", lambda p: (events.append(("fsync", os.path.basename(p))),
                                                           real_fsync(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", os.path.basename(b))),
                                                    real_replace(a, b)))
    model = mf.build_model(tiny_config())
    ck.save_training_checkpoint(tmp_path / "ckpt-1", model_state=model.state_dict(), model_config=model.config,
                                optimizer_state={"state": {}, "param_groups": []},
                                rng_state={"torch_cpu": torch.get_rng_state()}, trainer_state={"step": 1})
    final = events.index(("rename", "ckpt-1"))
    synced = {name for kind, name in events[:final] if kind == "fsync"}
    assert set(ck.TRAINING_FILES) | {integrity.MANIFEST, ".ckpt-1.tmp-" + str(os.getpid())} <= synced
    assert events[final + 1] == ("fsync", tmp_path.name)  # the folder holding the new name


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        mf.save_model(mf.build_model(tiny_config()), tmp_path / "m")
    finally:
        os.umask(old)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "m").iterdir()} == dict.fromkeys(
        [ck.WEIGHTS, ck.CONFIG, integrity.MANIFEST], mode)


def test_file_size_limit_during_a_checkpoint_write_is_one_line(run):
    model = mf.load(run / "final")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(ck.CheckpointError, match=r"final: cannot write the checkpoint \(.*\); nothing was replaced"):
            ck.save_training_checkpoint(run / "final", model_state=model.state_dict(), model_config=model.config,
                                        optimizer_state={"state": {}, "param_groups": []},
                                        rng_state={"torch_cpu": torch.get_rng_state()}, trainer_state={"step": 9})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock") == []
    ck.load_training_checkpoint(run / "final")  # the previous one is untouched


def test_full_disk_during_a_checkpoint_write_is_one_line(run, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    model = mf.build_model(tiny_config())
    with pytest.raises(ck.CheckpointError, match=r"cannot write the checkpoint \(No space left on device\)"):
        mf.save_model(model, run / "final")
    ck.load_training_checkpoint(run / "final")
