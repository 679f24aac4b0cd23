"""CPU inference: quantised head and embedding, freeze, streaming loading and saving, generate through the engine
(the engine against the eager model: test_inference_engine.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import memoryformer as mf
from inference_cases import build, needs_ext, rel_err
from memoryformer import inference as inf
from memoryformer.inference import engine as engine_mod
from memoryformer.layers import MemoryLayer
from memoryformer.ops import dequantize_rows


# ---------------------------------------------------------------------------------------------------------------
# Quantised head and embedding


@needs_ext
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3, 40])  # the compiled GEMV (<= SMALL_M rows) and the ATen path
def test_quantized_head_against_float_weights(dtype, rows):
    torch.manual_seed(0)
    lin = nn.Linear(72, 1003, bias=False)  # neither dim a multiple of the kernels' blocks
    q = inf.QuantizedLinear.from_float(lin, dtype)
    x = torch.randn(2, rows, 72)
    got = q(x)
    assert got.shape == (2, rows, 1003) and got.dtype == torch.float32
    # the kernel computes x @ (stored weight)^T (fp32 accumulation; the int8 GEMV rounds x to 14 bits) ...
    w = q.weight.double() * (q.scale.double()[:, None] if q.scale is not None else 1)
    assert rel_err(got, x.double() @ w.T) < (1e-4 if dtype == "int8" and rows <= inf.SMALL_M else 1e-5)
    # ... which is the fp32 head up to weight rounding: int8 absmax rows err <= 1/254 of a row's largest weight,
    # bf16 <= 2^-9 relative per weight
    assert rel_err(got, lin(x)) < (0.02 if dtype == "int8" else 0.01)


def test_quantized_embedding_and_state_dict_keys():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    q = inf.QuantizedEmbedding.from_float(emb, "int8")
    idx = torch.tensor([[0, 7, 49], [3, 3, 1]])
    want = (q.weight.float() * q.scale[:, None])[idx]
    torch.testing.assert_close(q(idx), want, rtol=0, atol=0)
    assert rel_err(q(idx), emb(idx)) < 0.01
    assert set(q.state_dict()) == {"weight", "scale"} and q.state_dict()["weight"].dtype == torch.int8
    b = inf.QuantizedEmbedding.from_float(emb, "bfloat16")
    assert set(b.state_dict()) == {"weight"} and rel_err(b(idx), emb(idx)) < 0.005
    with pytest.raises(ValueError, match="dtype"):
        inf.QuantizedEmbedding.from_float(emb, "int2")


@needs_ext
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_frozen_head_and_embedding_compute_with_the_stored_weights(dtype):
    # A Memory Layer's hash is discontinuous, so rounding the embedding moves logits by more than the rounding
    # wherever a sign flips; the reference is therefore the fp32 model holding the rounded values.
    model, ref = build(), build()
    idx = torch.randint(0, 300, (2, 9))
    inf.freeze(model, None, head=dtype)
    assert isinstance(model.head, inf.QuantizedLinear) and isinstance(model.embed, inf.QuantizedEmbedding)
    keys = {"head.weight", "embed.weight"} | ({"head.scale", "embed.scale"} if dtype == "int8" else set())
    assert keys <= set(model.state_dict()) and model.state_dict()["head.weight"].dtype == getattr(torch, dtype)
    with torch.no_grad():
        for name in ("head", "embed"):
            q = getattr(model, name)
            getattr(ref, name).weight.copy_(q.weight.float() * (q.scale[:, None] if q.scale is not None else 1))
        torch.testing.assert_close(model(idx)[0], ref(idx)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Loading small and saving


def test_load_for_inference_matches_freeze(tmp_path):
    model = build()
    mf.save_model(model, tmp_path / "ck")
    got = inf.load_for_inference(tmp_path / "ck", tables="int8", head="int8")
    want = inf.freeze(build(), "int8")
    idx = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(got(idx)[0], want(idx)[0], rtol=0, atol=1e-6)
    assert got.blocks[1].mlp.l2.tables.dtype == torch.int8 and got.head.weight.dtype == torch.int8
    assert not any(p.requires_grad for p in got.parameters())
    # save it as it is, load it back as it is
    mf.save_model(got, tmp_path / "q")
    meta = _metadata(tmp_path / "q" / "model.safetensors")
    assert meta[inf.TABLES_KEY] == "int8/float32" and meta[inf.HEAD_KEY] == "int8/int8"
    again = inf.load_for_inference(tmp_path / "q", tables=None, head=None)
    plain = mf.load(tmp_path / "q")  # a quantised head in the file: mf.load rebuilds it as it is
    assert isinstance(plain.head, inf.QuantizedLinear) and plain.blocks[0].mlp.l1.tables.dtype == torch.int8
    with torch.no_grad():
        torch.testing.assert_close(again(idx)[0], got(idx)[0], rtol=0, atol=0)
        torch.testing.assert_close(plain(idx)[0], got(idx)[0], rtol=0, atol=0)
    # and converted on the way in: int8 file -> bf16 tables and head
    bf = inf.load_for_inference(tmp_path / "q", tables="bfloat16", head="bfloat16", embed="float32")
    qkv = got.blocks[0].attn.qkv
    assert torch.equal(bf.blocks[0].attn.qkv.tables, dequantize_rows(qkv.tables, qkv.scale, torch.bfloat16))
    assert torch.equal(bf.head.weight, dequantize_rows(got.head.weight, got.head.scale, torch.bfloat16))
    assert isinstance(bf.embed, nn.Embedding) and bf.embed.weight.dtype == torch.float32


@needs_ext
@pytest.mark.parametrize("tables", ["int8", "bfloat16"])
def test_generate_takes_the_engine_for_a_frozen_model_and_matches_eager(tmp_path, tables):
    from memoryformer.generate import generate

    mf.save_model(build(), tmp_path / "ck")
    model = mf.load(tmp_path / "ck", tables=tables)  # the one-line fast path
    assert inf.frozen(model) and isinstance(model.head, inf.QuantizedLinear)
    prompt = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    fast = generate(model, prompt, 50, temperature=0)  # 56 tokens: past max_seq_len = 40, the window slides
    eng = engine_mod._ENGINES[model][1]  # the engine ran (its cache in bf16: the eager model is compared in fp32 above)
    assert eng.kv_dtype == torch.bfloat16
    head = eng.generate(prompt, 34)  # 40 tokens from the engine, then the eager model on the sliding window
    assert fast.shape == (1, 56) and torch.equal(fast, generate(model, head, 16, temperature=0, engine=False))
    # sampling: the engine's logits through the same sampler, reproducible from the seed
    a = generate(model, prompt, 20, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 20, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 26)
    # the cache of engines does not keep a model alive
    import gc
    import weakref

    ref = weakref.ref(model)
    del model, eng
    gc.collect()
    assert ref() is None
    # a trained (unfrozen) model keeps the eager reference unless asked
    plain = build()
    generate(plain, prompt, 3, temperature=0)
    assert plain not in engine_mod._ENGINES
    with pytest.raises(ValueError, match="engine"):
        generate(build(hash_projection=True), prompt, 2, engine=True)


def test_freeze_freezes_tables_head_and_embedding():
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = build()(idx)[0]
        for dtype, head in (("int8", torch.int8), ("bfloat16", torch.bfloat16), ("float16", None)):
            model = mf.freeze(build(), dtype)
            assert model.blocks[0].attn.qkv.tables.dtype == getattr(torch, dtype)
            if head is None:
                assert isinstance(model.head, nn.Linear) and isinstance(model.embed, nn.Embedding)
            else:
                assert model.head.weight.dtype == head and model.embed.weight.dtype == head
            # the same as freezing the parts one by one with the primitives (a random model's hash codes flip
            # under any rounding, so the fp32 model is no reference here; the head's own tolerance is tested above)
            parts = build()
            for m in parts.modules():
                if isinstance(m, MemoryLayer):
                    m.freeze(dtype)
            if head is not None:
                parts.head, parts.embed = inf.freeze_rows(parts.head, head), inf.freeze_rows(parts.embed, head)
            torch.testing.assert_close(model(idx)[0], parts(idx)[0], rtol=0, atol=0)
            assert model(idx)[0].shape == want.shape
        dense = mf.freeze(mf.build_model(mf.get_config("micro-dense", n_layer=1, d_model=32, n_head=2,
                                                       vocab_size=50)), "int8")
        assert isinstance(dense.head, inf.QuantizedLinear)
        # the embedding alone, and back to float32 from int8
        mixed = mf.freeze(build(), None, head="bfloat16", embedding="int8")
        assert mixed.head.weight.dtype == torch.bfloat16 and mixed.embed.weight.dtype == torch.int8
        back = mf.freeze(mixed, None, head="float32", embedding="float32")
        assert isinstance(back.head, nn.Linear) and back.embed.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="head"):
        mf.freeze(build(), "int8", head="float16")
    with pytest.raises(ValueError, match="tables"):
        mf.freeze(build(), "int2")


def test_load_with_tables_checks_the_files(tmp_path):
    ck = mf.save_model(build(), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "d_model": 32}))
    with pytest.raises(mf.MemoryFormerError, match="config.json|manifest|d_model|shape"):
        mf.load(bad, tables="int8")
    with pytest.raises(mf.MemoryFormerError, match="shape"):
        mf.load(bad, tables="int8", verify=False)
    with pytest.raises(mf.MemoryFormerError, match="tables"):
        mf.load(ck, tables="int2")


def test_int8_files_keep_their_keys_and_an_older_layout_is_one_clear_line(tmp_path):
    from safetensors.torch import load_file, save_file

    mf.save_model(mf.freeze(build(), "int8"), tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    state, meta = load_file(f), _metadata(f)
    int8 = {k for k, v in state.items() if v.dtype == torch.int8}
    assert int8 == {"embed.weight", "head.weight"} | {k for k in state if k.endswith(".tables")}
    assert {k for k in state if k.endswith("scale")} == {k.rsplit(".", 1)[0] + ".scale" for k in int8}
    old = {k.replace(".scale", ".table_scale") if k.startswith("blocks.") else k: v for k, v in state.items()}
    save_file(old, f, metadata=meta)
    with pytest.raises(mf.MemoryFormerError, match=r"blocks\.0\.attn\.qkv\.table_scale.*export") as e:
        mf.load(tmp_path / "q", verify=False)
    assert "\n" not in str(e.value)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def test_load_for_inference_errors(tmp_path):
    with pytest.raises(mf.MemoryFormerError, match="not a checkpoint directory"):
        inf.load_for_inference(tmp_path / "none")
    model = build()
    mf.save_model(model, tmp_path / "ck")
    with pytest.raises(ValueError, match="tables: expected one of"):
        inf.load_for_inference(tmp_path / "ck", tables="int2")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mf.MemoryFormerError, match="missing tensor 'blocks.2"):
        inf.load_for_inference(tmp_path / "ck")


_RSS_SCRIPT = r"""
import gc, sys, torch
import memoryformer as mf
from memoryformer import inference as inf
from memoryformer.ops import cpu_ext

def peak_rss():  # VmHWM: this process's own peak (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

cpu_ext.get()
inf.load_for_inference(sys.argv[2], tables="int8", head="int8")  # warm up: libraries, threads, allocator
gc.collect()
before = peak_rss()
model = inf.load_for_inference(sys.argv[1], tables="int8", head="int8")
peak = peak_rss()
size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(before, peak, size)
"""


@pytest.mark.slow
def test_load_for_inference_peak_memory(tmp_path):
    # a model whose fp32 file is 1.1 GB (4x its int8 size): the peak RSS increase while loading must stay <= 1.5x
    # the int8 model, i.e. the fp32 tensors are never all in memory (nor even one whole large one)
    cfg = mf.get_config("micro", n_layer=4, d_model=512, n_head=8, tau=8, vocab_size=4096, max_seq_len=64)
    with torch.device("meta"):
        shapes = mf.build_model(cfg).state_dict()
    from safetensors.torch import save_file

    save_file({k: torch.randn(v.shape) * 0.02 for k, v in shapes.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    cfg.save(tmp_path / "config.json")
    torch.manual_seed(0)
    mf.save_model(mf.build_model(mf.get_config("micro", n_layer=1, d_model=32, n_head=2, vocab_size=64)), tmp_path / "warm")
    env = {**os.environ, "PYTHONPATH": str(Path(inf.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), str(tmp_path / "warm")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    before, peak, size = map(int, out.stdout.split()[-3:])
    assert (tmp_path / "model.safetensors").stat().st_size > 3.5 * size
    # the lower bound shows the measure sees the model at all
    assert 0.75 * size <= peak - before <= 1.5 * size, (peak - before) / size
