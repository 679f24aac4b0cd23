"""Bad input, flag by flag and function by function: one line naming the culprit (exit 2 on the command line), or the
documented behaviour; never a traceback, never a silently wrong result.

Classes walked for every command and public entry point: non-finite, zero, negative, empty, wrong type, wrong
device, wrong shape, missing file, unwritable place, contradicting files.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, tiny_config

import memoryformer as mf
from memoryformer import checkpoint as ck
from memoryformer import integrity
from memoryformer.cli import main as cli_main
from memoryformer.generate import generate
from memoryformer.train import TrainConfig, train

SETS = ["--set", "n_layer=1", "--set", "d_model=32", "--set", "n_head=2", "--set", "max_seq_len=32"]


@pytest.fixture(scope="module")
def paths(corpus, tmp_path_factory):
    """{ck, dense, run, file, corpus, bench, tmp, cache} shared by the command-line cases (none of them writes)."""
    tmp = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    mf.save_model(mf.build_model(tiny_config()), tmp / "ck")
    mf.save_model(mf.build_model(tiny_config("transformer")), tmp / "dense")
    t = TrainConfig(data=str(corpus), out=str(tmp / "run"), batch_size=2, seq_len=32, max_steps=2, eval_every=0,
                    eval_tokens=64, ckpt_every=1, progress=False, verbose=False, cache_dir=str(corpus / "cache"))
    train(tiny_config(), t)
    (tmp / "afile").write_text("not a folder")
    (tmp / "empty.yaml").write_text("")
    (tmp / "train-only.yaml").write_text("train:\n  lr: 1e-3\n")
    (tmp / "nan.yaml").write_text("preset: micro\ntemperature: .nan\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "nodata").mkdir()
    bench = tmp / "bench"
    shutil.copytree(FIXTURES / "eval", bench)
    piqa = bench / "piqa_validation.jsonl"
    piqa.write_text(piqa.read_text().replace('"label": 1}', '"label": 7}'))
    return {k: str(v) for k, v in dict(ck=tmp / "ck", dense=tmp / "dense", run=tmp / "run", file=tmp / "afile",
                                          corpus=corpus, bench=bench, tmp=tmp, cache=corpus / "cache").items()}


def expect_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert match in err, err


CLI_CASES = [
    # train: every number non-finite / zero / negative, files missing / empty / contradicting, places unwritable
    ("train-batch-0", "train --config micro --batch-size 0 --out {tmp}/o", "batch_size: expected an integer >= 1"),
    ("train-lr-nan", "train --config micro --lr nan --out {tmp}/o", "lr: expected a finite number"),
    ("train-lr-inf", "train --config micro --lr inf --out {tmp}/o", "lr: expected a finite number"),
    ("train-lr-neg", "train --config micro --lr -1 --out {tmp}/o", "lr: expected a number in (0.0"),
    ("train-steps-0", "train --config micro --max-steps 0 --out {tmp}/o", "max_steps: expected an integer >= 1"),
    ("train-tokens-neg", "train --config micro --max-tokens -5 --out {tmp}/o", "max_tokens: expected an integer"),
    ("train-time-0", "train --config micro --time-budget 0 --out {tmp}/o", "time_budget: expected a number in (0.0"),
    ("train-eval-tokens-0", "train --config micro --eval-tokens 0 --out {tmp}/o", "eval_tokens"),
    ("train-log-0", "train --config micro --log-every 0 --out {tmp}/o", "log_every"),
    ("train-keep-0", "train --config micro --keep-checkpoints 0 --out {tmp}/o", "keep_checkpoints"),
    ("train-skips-0", "train --config micro --max-skipped-steps 0 --out {tmp}/o", "max_skipped_steps"),
    ("train-clip-neg", "train --config micro --grad-clip -1 --out {tmp}/o", "grad_clip"),
    ("train-beta-nan", "train --config micro --beta1 nan --out {tmp}/o", "beta1: expected a finite number"),
    ("train-warmup-2", "train --config micro --warmup-frac 2 --out {tmp}/o", "warmup_frac: expected a number in"),
    ("train-valfrac-0", "train --config micro --val-fraction 0 --out {tmp}/o", "val_fraction"),
    ("train-seed-neg", "train --config micro --seed -1 --out {tmp}/o", "seed: expected an integer >= 0"),
    ("train-seq-too-long", "train --config micro {sets} --seq-len 64 --out {tmp}/o", "seq_len: 64 exceeds"),
    ("train-out-file", "train --config micro {sets} --max-steps 1 --out {file}", "exists and is not a folder"),
    ("train-out-below-file", "train --config micro {sets} --max-steps 1 --out {file}/run", "which is a file"),
    ("train-empty-yaml", "train --config {tmp}/empty.yaml --out {tmp}/o", "the file is empty"),
    ("train-presetless-yaml", "train --config {tmp}/train-only.yaml --out {tmp}/o", "names no preset"),
    ("train-nan-yaml", "train --config {tmp}/nan.yaml --out {tmp}/o", "temperature: expected a finite number"),
    ("train-set-nan", "train --config micro --set rotary_pct=.nan --out {tmp}/o", "rotary_pct: expected a finite"),
    ("train-set-0", "train --config micro --set d_model=0 --out {tmp}/o", "d_model: expected an integer >= 1"),
    ("train-set-bad", "train --config micro --set tau --out {tmp}/o", "--set: expected KEY=VALUE"),
    ("train-missing-config", "train --config {tmp}/none.yaml --out {tmp}/o", "config file not found"),
    ("train-resume-missing", "train --resume {tmp}/none", "no such folder to resume from"),
    ("train-resume-contradict", "train --resume {run} --batch-size 8", "batch_size: 8 contradicts"),
    ("train-resume-set", "train --resume {run} --set d_model=64", "d_model: 64 contradicts the checkpoint's 32"),
    ("train-empty-data", "train --config micro {sets} --data {tmp}/empty.jsonl --max-steps 1 --out {tmp}/o",
     "empty.jsonl: no text found"),
    ("train-data-empty-folder", "train --config micro {sets} --data {tmp}/nodata --out {tmp}/o", "holds no"),
    ("train-data-missing", "train --config micro {sets} --data {tmp}/none.jsonl --out {tmp}/o", "none.jsonl"),
    ("train-cache-below-file", "train --config micro {sets} --data {corpus} --cache-dir {file}/c --max-steps 1 "
     "--out {tmp}/o", "cannot create the token cache folder"),
    ("train-micro-batch", "train --config micro {sets} --data {corpus} --batch-size 4 --micro-batch-size 3 "
     "--max-steps 1 --seq-len 32 --out {tmp}/o", "micro_batch_size: 3 does not divide"),
    ("train-cuda", "train --config micro --device cuda --out {tmp}/o", "device: 'cuda' requested"),
    # generate
    ("gen-top-k-0", "generate --checkpoint {ck} --prompt hi --top-k 0", "top_k: expected an integer >= 1"),
    ("gen-top-k-neg", "generate --checkpoint {ck} --prompt hi --top-k -3", "top_k: expected an integer >= 1"),
    ("gen-temp-nan", "generate --checkpoint {ck} --prompt hi --temperature nan", "temperature: expected a finite"),
    ("gen-temp-neg", "generate --checkpoint {ck} --prompt hi --temperature -1", "temperature: expected a finite"),
    ("gen-top-p-0", "generate --checkpoint {ck} --prompt hi --top-p 0", "top_p: expected a number in (0, 1]"),
    ("gen-top-p-big", "generate --checkpoint {ck} --prompt hi --top-p 1.5", "top_p: expected a number in (0, 1]"),
    ("gen-top-p-nan", "generate --checkpoint {ck} --prompt hi --top-p nan", "top_p"),
    ("gen-new-neg", "generate --checkpoint {ck} --prompt hi --max-new-tokens -1", "max_new_tokens"),
    ("gen-seed-neg", "generate --checkpoint {ck} --prompt hi --seed -2", "seed: expected an integer >= 0"),
    ("gen-empty-prompt", "generate --checkpoint {ck} --prompt=", "prompt: empty"),
    ("gen-cuda", "generate --checkpoint {ck} --prompt hi --device cuda", "device: 'cuda' requested but no CUDA"),
    ("gen-bad-device", "generate --checkpoint {ck} --prompt hi --device gpu", "device: 'gpu' is not a torch device"),
    ("gen-missing", "generate --checkpoint {tmp}/none --prompt hi", "none: not a checkpoint directory"),
    ("gen-not-a-checkpoint", "generate --checkpoint {tmp}/nodata --prompt hi", "model.safetensors: missing"),
    # eval
    ("eval-cuda", "eval --checkpoint {ck} --data sample --device cuda", "device: 'cuda' requested"),
    ("eval-bad-device", "eval --checkpoint {ck} --data sample --device tpu", "device: 'tpu' is not a torch device"),
    ("eval-batch-0", "eval --checkpoint {ck} --data sample --batch-size 0", "batch-size: expected a positive"),
    ("eval-limit-0", "eval --checkpoint {ck} --tasks piqa --data-dir {bench} --limit 0", "limit: expected a positive"),
    ("eval-seq-0", "eval --checkpoint {ck} --data sample --seq-len 0", "seq-len: expected a positive integer"),
    ("eval-max-tokens-neg", "eval --checkpoint {ck} --data sample --max-tokens -4", "max-tokens: expected a positive"),
    ("eval-task", "eval --checkpoint {ck} --tasks piqa,nosuch --data-dir {bench}", "tasks: unknown task 'nosuch'"),
    ("eval-data-dir", "eval --checkpoint {ck} --tasks piqa --data-dir {tmp}/none", "is not a folder"),
    ("eval-label", "eval --checkpoint {ck} --tasks piqa --data-dir {bench} --no-progress",
     "piqa_validation.jsonl: example 2 has label 7, but it has 2 choices"),
    ("eval-data-missing", "eval --checkpoint {ck} --data {tmp}/none.jsonl", "none.jsonl: no such file or folder"),
    # analyze
    ("analyze-cuda", "analyze --checkpoint {ck} --out {tmp}/a --device cuda", "device: 'cuda' requested"),
    ("analyze-tokens-0", "analyze --checkpoint {ck} --out {tmp}/a --tokens 0", "tokens: expected a positive"),
    ("analyze-batch-0", "analyze --checkpoint {ck} --out {tmp}/a --batch-size 0", "batch-size: expected a positive"),
    ("analyze-dense", "analyze --checkpoint {dense} --out {tmp}/a --tokens 64", "has no Memory Layers"),
    ("analyze-out-file", "analyze --checkpoint {ck} --out {file}", "out: {file} exists and is not a folder"),
    # flops, export, demo, ablate
    ("flops-seq-0", "flops --seq-len 0", "seq-len: expected a positive integer, got 0"),
    ("flops-seq-neg", "flops --seq-len -5", "seq-len: expected a positive integer, got -5"),
    ("flops-plot-missing-dir", "flops --plot {tmp}/none/f.png", "f.png: No such file or directory"),
    ("train-out-is-data", "train --config micro --data {tmp} --out {tmp}", "is the input --data"),
    ("demo-out-holds-data", "demo --data {tmp}/d/t.txt --out {tmp}/d", "contains the input --data"),
    ("ablate-out-in-data", "ablate --suite weighting --data {tmp} --out {tmp}/runs", "lies inside the input --data"),
    ("analyze-out-in-ckpt", "analyze --checkpoint {tmp} --out {tmp}/a", "lies inside the input --checkpoint"),
    ("flops-seq-huge", "flops --seq-len 100000000000000000000", "seq-len: expected at most 16,777,216 tokens"),
    ("flops-plot-folder", "flops --plot {tmp}/", "--plot: expected a file name such as figure1.png, got the folder"),
    ("flops-plot-no-suffix", "flops --plot {tmp}/fig", "--plot: expected a file name ending in .png"),
    ("export-out-file", "export --checkpoint {ck} --out {file}", "exists and is not an empty folder"),
    ("export-missing", "export --checkpoint {tmp}/none --out {tmp}/e", "not a checkpoint directory"),
    ("export-dense-tables", "export --checkpoint {dense} --out {tmp}/e --tables int8", "no memory tables"),
    ("demo-minutes-0", "demo --minutes 0", "minutes: expected a positive number"),
    ("demo-minutes-nan", "demo --minutes nan", "minutes: expected a positive number"),
    ("demo-tokens-0", "demo --tokens 0", "tokens: expected a positive number"),
    ("demo-batch-0", "demo --batch-size 0", "batch-size: expected a positive integer, got 0"),
    ("demo-eval-0", "demo --eval-tokens 0", "eval-tokens: expected a positive integer, got 0"),
    ("ablate-suite", "ablate --suite nosuch", "suite: unknown suite 'nosuch'"),
    ("ablate-tokens-0", "ablate --suite tau --tokens 0", "tokens: expected a positive integer"),
    ("ablate-batch-neg", "ablate --suite tau --batch-size -2", "batch-size: expected a positive integer"),
]


@pytest.mark.parametrize("argv,match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2(paths, capsys, argv, match):
    expect_one_line(argv.format(sets=" ".join(SETS), **paths).split(" "), match.format(**paths), capsys)


def _edited_config(src, dst, **fields):
    """A copy of checkpoint `src` whose config.json says `fields`, with its manifest re-recorded."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / ck.CONFIG).read_text())
    (dst / ck.CONFIG).write_text(json.dumps({**cfg, **fields}))
    integrity.write_manifest(dst, json.loads((dst / integrity.MANIFEST).read_text())["files"])
    return dst


@pytest.mark.parametrize("fields,match", [
    ({"d_model": 64}, "d_model=64 does not match model.safetensors, whose tensors give d_model=32"),
    ({"temperature": math.nan}, "temperature: expected a finite number"),
    ({"rotary_pct": math.nan}, "rotary_pct: expected a finite number"),
    ({"rotary_pct": math.inf}, "rotary_pct: expected a finite number"),
], ids=["d_model", "temperature-nan", "rotary_pct-nan", "rotary_pct-inf"])
def test_generate_and_resume_name_the_config_field(paths, tmp_path, capsys, fields, match):
    edited = _edited_config(Path(paths["ck"]), tmp_path / "gen", **fields)
    expect_one_line(["generate", "--checkpoint", str(edited), "--prompt", "hi"], match, capsys)
    run = tmp_path / "run"
    shutil.copytree(paths["run"], run)
    _edited_config(run / "final", tmp_path / "scratch", **fields)
    shutil.rmtree(run / "final")
    shutil.move(tmp_path / "scratch", run / "final")
    expect_one_line(["train", "--resume", str(run / "final")], match, capsys)


def test_no_verify_loads_an_edited_checkpoint(paths, tmp_path, capsys):
    dst = tmp_path / "edited"
    shutil.copytree(paths["ck"], dst)
    cfg = dst / ck.CONFIG
    cfg.write_text(cfg.read_text().replace('"backend": "auto"', '"backend": "reference"'))
    expect_one_line(["generate", "--checkpoint", str(dst), "--prompt", "hi"], "config.json: ", capsys)
    cli_main(["generate", "--checkpoint", str(dst), "--prompt", "hi", "--max-new-tokens", "2", "--no-verify"])
    assert capsys.readouterr().out.startswith("hi")


def test_second_train_on_a_running_run_is_refused(paths, capsys):
    with integrity.RunLock(paths["run"]):
        expect_one_line(["train", "--resume", paths["run"], "--max-steps", "3"], "another memoryformer process",
                        capsys)


def test_broken_pipe_exits_quietly(tmp_path):
    proc = subprocess.run(f"{sys.executable} -m memoryformer flops | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.stdout.startswith("Table 1") and proc.stderr == ""


# ---------------------------------------------------------------------------------------------------------------
# The Python API


def _layer(**kw):
    return mf.MemoryLayer(16, 8, tau=4, **kw)


def _hash_of(layer, x):
    return layer.hash(x)


API_CASES = [
    ("layer-tau-0", lambda: mf.MemoryLayer(16, 8, tau=0), ValueError, "tau: expected an integer in [1, 16]"),
    ("layer-tau-17", lambda: mf.MemoryLayer(34, 8, tau=17), ValueError, "tau: expected an integer in [1, 16]"),
    ("layer-tau-float", lambda: mf.MemoryLayer(16, 8, tau=4.0), ValueError, "tau"),
    ("layer-in-0", lambda: mf.MemoryLayer(0, 8, tau=4), ValueError, "in_features: expected a positive integer"),
    ("layer-out-neg", lambda: mf.MemoryLayer(16, -8, tau=4), ValueError, "out_features: expected a positive"),
    ("layer-not-multiple", lambda: mf.MemoryLayer(18, 8, tau=4), ValueError, "not a multiple of tau=4"),
    ("layer-weighting", lambda: _layer(weighting="softmax"), ValueError, "weighting: expected one of"),
    ("layer-temp-nan", lambda: _layer(temperature=math.nan), ValueError, "temperature: expected a positive"),
    ("layer-temp-0", lambda: _layer(temperature=0.0), ValueError, "temperature: expected a positive"),
    ("layer-temp-inf", lambda: _layer(temperature=math.inf), ValueError, "temperature: expected a positive"),
    ("layer-bit-order", lambda: _layer(bit_order="big"), ValueError, "bit_order: expected one of"),
    ("layer-backend", lambda: _layer(backend="cuda-fast"), ValueError, "backend: expected one of"),
    ("layer-int-input", lambda: _layer()(torch.ones(2, 16, dtype=torch.long)), TypeError, "floating-point tensor"),
    ("layer-list-input", lambda: _layer()([1.0] * 16), TypeError, "floating-point tensor, got list"),
    ("layer-wrong-width", lambda: _layer()(torch.randn(2, 12)), ValueError, "expects input (..., 16)"),
    ("layer-0-dim", lambda: _layer()(torch.tensor(1.0)), ValueError, "expects input (..., 16)"),
    ("layer-meta-input", lambda: _layer()(torch.empty(2, 16, device="meta")), ValueError,
     "input: on meta, but the layer's tables are on cpu"),
    ("layer-other-batch-hash", lambda: _layer()(torch.randn(3, 16), hash=_hash_of(_layer(), torch.randn(5, 16))),
     ValueError, "hash: expected codes and weights of shape (3, 4)"),
    ("layer-hash-code-range", lambda: _layer()(torch.randn(2, 16), hash=(torch.full((2, 4), 16), torch.ones(2, 4))),
     ValueError, "hash: code 16 is outside the 16 rows"),
    ("layer-hash-code-neg", lambda: _layer()(torch.randn(2, 16), hash=(torch.full((2, 4), -1), torch.ones(2, 4))),
     ValueError, "hash: code -1 is outside"),
    ("layer-hash-float-codes", lambda: _layer()(torch.randn(2, 16), hash=(torch.zeros(2, 4), torch.ones(2, 4))),
     TypeError, "hash: expected int64/int32 codes"),
    ("ffn-activation", lambda: mf.MemoryFFN(16, 4, activation="relu"), ValueError, "activation: expected None"),
    ("freeze-dtype", lambda: _layer().freeze("int2"), ValueError, "dtype: expected one of"),
    ("model-token-too-big", lambda: _tiny()(torch.tensor([[1, 50304]])), ValueError,
     "idx: token id 50304 is outside the vocabulary [0, 50304)"),
    ("model-token-neg", lambda: _tiny()(torch.tensor([[-1, 2]])), ValueError, "idx: token id -1 is outside"),
    ("model-float-idx", lambda: _tiny()(torch.zeros(1, 4)), ValueError, "idx: expected a (B, T) integer tensor"),
    ("model-1d-idx", lambda: _tiny()(torch.zeros(4, dtype=torch.long)), ValueError, "idx: expected a (B, T)"),
    ("model-too-long", lambda: _tiny()(torch.zeros(1, 33, dtype=torch.long)), ValueError,
     "max_seq_len: sequence of 33 tokens exceeds"),
    ("model-targets-shape", lambda: _tiny()(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)),
     ValueError, "targets: expected integer token ids of idx's shape (2, 4)"),
    ("model-targets-range", lambda: _tiny()(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 60000)),
     ValueError, "targets: token id 60000 is outside"),
    ("model-cache-batch", lambda: _tiny().hidden(torch.zeros(2, 3, dtype=torch.long),
                                                 cache=mf.KVCache.for_model(_tiny(), 1)),
     ValueError, "cache: holds 1 rows, but idx has 2"),
    ("model-cache-full", lambda: _tiny().hidden(torch.zeros(1, 5, dtype=torch.long),
                                                cache=mf.KVCache.for_model(_tiny(), 1, capacity=4)),
     ValueError, "cache: 0 + 5 tokens exceed its capacity of 4"),
    ("model-config-type", lambda: mf.MemoryFormer({"d_model": 32}), TypeError, "config: expected a memoryformer"),
    ("generate-top-k-0", lambda: generate(_tiny(), torch.zeros(1, 2, dtype=torch.long), 2, top_k=0), ValueError,
     "top_k: expected an integer >= 1"),
    ("generate-temp-nan", lambda: generate(_tiny(), torch.zeros(1, 2, dtype=torch.long), 2, temperature=math.nan),
     ValueError, "temperature"),
    ("generate-empty-idx", lambda: generate(_tiny(), torch.zeros(1, 0, dtype=torch.long), 2), ValueError,
     "idx: expected a (B, T) tensor of token ids with T >= 1"),
    ("generate-new-float", lambda: generate(_tiny(), torch.zeros(1, 2, dtype=torch.long), 2.5), ValueError,
     "max_new_tokens"),
    ("config-preset", lambda: mf.get_config("huge"), mf.ConfigError, "preset: unknown preset 'huge'"),
    ("config-temp-nan", lambda: tiny_config(temperature=math.nan), mf.ConfigError, "temperature: expected a finite"),
    ("config-rotary-big", lambda: tiny_config(rotary_pct=1.5), mf.ConfigError, "rotary_pct: expected a number in"),
    ("config-heads", lambda: tiny_config(n_head=3), mf.ConfigError, "n_head: expected a divisor of d_model=32"),
    ("config-tau-divisor", lambda: tiny_config(tau=5), mf.ConfigError, "tau: expected a divisor of d_model=32"),
    ("config-bool-int", lambda: tiny_config(n_layer=True), mf.ConfigError, "n_layer: expected an integer"),
    ("config-str-field", lambda: tiny_config(d_model="32"), mf.ConfigError, "d_model: expected an integer"),
    ("config-unknown-key", lambda: mf.ModelConfig.from_dict({"dmodel": 3}), mf.ConfigError, "unknown config key"),
    ("train-config-lr-nan", lambda: TrainConfig(lr=math.nan), mf.ConfigError, "lr: expected a finite number"),
    ("train-config-out-empty", lambda: TrainConfig(out=""), mf.ConfigError, "out: expected a non-empty string"),
    ("train-config-skips", lambda: TrainConfig(max_skipped_steps=-1), mf.ConfigError, "max_skipped_steps"),
    ("train-config-verify", lambda: TrainConfig(verify="no"), mf.ConfigError, "verify: expected true or false"),
    ("load-missing", lambda: mf.load("/nonexistent/ck"), mf.MemoryFormerError, "not a checkpoint directory"),
    ("load-bad-device", lambda: mf.load(FIXTURES, device="cuda:7"), mf.MemoryFormerError, "device: "),
    ("tokens-split", lambda: __import__("memoryformer.data").data.load_tokens("sample", "test"), ValueError,
     "split: expected 'train' or 'val'"),
    ("tokens-missing", lambda: __import__("memoryformer.data").data.load_tokens("/nonexistent.jsonl"),
     mf.MemoryFormerError, "/nonexistent.jsonl: no such file or folder"),
    ("sampler-short", lambda: __import__("memoryformer.data").data.WindowSampler(10, 33, 0), mf.MemoryFormerError,
     "10 tokens is shorter than one window of 33"),
    ("eval-limit-0", lambda: __import__("memoryformer.evaluate").evaluate.evaluate_tasks(
        _tiny(), "piqa", data_dir=FIXTURES / "eval", limit=0), mf.MemoryFormerError, "limit: expected a positive"),
    ("ppl-seq-too-long", lambda: __import__("memoryformer.evaluate").evaluate.perplexity(_tiny(), "sample", seq_len=99),
     mf.MemoryFormerError, "seq-len: expected 1..32"),
]


def _tiny():
    return mf.build_model(tiny_config()).eval()


@pytest.mark.parametrize("fn,exc,match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_names_the_culprit(fn, exc, match):
    with pytest.raises(exc) as e:
        fn()
    assert match in str(e.value) and "\n" not in str(e.value)


def test_save_model_into_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(mf.MemoryFormerError, match="out: .*f exists and is not a folder"):
        mf.save_model(_tiny(), tmp_path / "f")
    with pytest.raises(mf.MemoryFormerError, match="lies below .*f, which is a file"):
        mf.save_model(_tiny(), tmp_path / "f" / "m")


@pytest.mark.parametrize("weighting", ["release", "paper"])
def test_nan_and_inf_inputs_have_a_documented_result(weighting):
    """NaN in a chunk makes that token's whole output row NaN (its weight is NaN); +-inf saturates the paper
    weighting (finite output) and makes the release weighting's ||z||_1 infinite; other tokens are untouched."""
    torch.manual_seed(0)
    layer = _layer(weighting=weighting, bias=False).eval()
    x = torch.randn(4, 16)
    x[1, 2], x[2, 5], x[3, 0] = math.nan, math.inf, -math.inf
    with torch.no_grad():  # (3 tokens: the same kernel as for x, not the 1-2 token decode kernel)
        y, clean = layer(x), layer(x[:1].expand(3, 16))
    assert torch.equal(y[0], clean[0]) and y[1].isnan().all()
    if weighting == "paper":
        assert y[2:].isfinite().all()
    else:
        assert not y[2:].isfinite().any()
