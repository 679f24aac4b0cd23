"""CPU inference: quantised head and embedding, the compiled decode engine against the eager model, small loading."""

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
from memoryformer import inference as inf
from memoryformer.inference import engine as engine_mod
from memoryformer.layers import MemoryLayer
from memoryformer.ops import dequantize_rows

needs_ext = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


def small_cfg(**kw):
    base = dict(n_layer=2, d_model=64, n_head=4, vocab_size=300, max_seq_len=40, tau=8)
    return mf.get_config("micro", **{**base, **kw})


def build(seed=0, **kw):
    torch.manual_seed(seed)
    model = mf.MemoryFormer(small_cfg(**kw)).eval()
    with torch.no_grad():  # norms away from their init so that they matter
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(std=0.1)
    return model


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


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
        inf.QuantizedEmbedding.from_float(emb, "int4")


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
# The decode engine == the eager model


def check_engine(model, T0: int, steps: int, tol: float, kv_dtype=torch.float32, batch=1, seed=1):
    """Prefill T0 tokens, then decode `steps` more: every logits row against model(idx)[0] (no cache)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch, T0 + steps), generator=g)
    with torch.no_grad():
        want = model(idx)[0]  # (B, T, V) full uncached forward
    eng = inf.DecodeEngine(model, batch_size=batch, kv_dtype=kv_dtype)
    errs = [rel_err(eng.prefill(idx[:, :T0]), want[:, T0 - 1])]
    for t in range(T0, T0 + steps):
        errs.append(rel_err(eng.step(idx[:, t]), want[:, t]))
    assert eng.pos == T0 + steps
    assert max(errs) < tol, errs
    return errs


@needs_ext
@pytest.mark.parametrize("tables", ["float32", "int8"])
@pytest.mark.parametrize("weighting,bit_order,bias", [("release", "msb", True), ("paper", "lsb", False),
                                                       ("release", "lsb", False), ("paper", "msb", True)])
def test_engine_matches_eager(tables, weighting, bit_order, bias):
    model = build(weighting=weighting, bit_order=bit_order, memory_bias=bias, temperature=0.8)
    if tables != "float32":
        inf.freeze(model, tables, head="float32")
    for T0 in (1, 2, 5):
        check_engine(model, T0, 6, tol=2e-5)


@needs_ext
def test_engine_tau10_gelu_and_int8_head():
    model = build(d_model=80, n_head=4, tau=10, block_activation="gelu")  # K = 8, Memory-Block tables of 4096 rows
    inf.freeze(model, "int8")
    check_engine(model, 3, 8, tol=2e-4)  # the engine's int8 head rounds its input to 14 bits, the eager one (T > 8) not


@needs_ext
def test_engine_bf16_tables():
    # bf16 tables: the eager model rounds each layer's output to bf16 (fbgemm's bf16 bag) where the engine keeps
    # fp32 sums, so a hash code can flip where a LayerNorm output sits within a rounding of 0: compare the logits
    # of the engine with the eager model whose tables hold the same bf16 values in fp32 (exact), and the argmax
    model = build()
    inf.freeze(model, "bfloat16", head="float32")
    exact = build()
    for a, b in zip(exact.modules(), model.modules()):
        if isinstance(a, MemoryLayer):
            a.tables.data = b.tables.detach().float()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 300, (1, 12), generator=g)
    eng = inf.DecodeEngine(model, kv_dtype=torch.float32)
    with torch.no_grad():
        want = exact(idx)[0]
    got = [eng.prefill(idx[:, :1])] + [eng.step(idx[:, t]) for t in range(1, 12)]
    got = torch.stack(got, 1)
    assert rel_err(got, want) < 2e-5


def reference_decode(model, idx: torch.Tensor, kv_round) -> torch.Tensor:
    """Token-by-token decoding in float64 with plain torch ops and each key/value passed through `kv_round` before
    it is stored: (B, T) -> logits (B, T, V). The model's own modules, float64 everywhere else."""
    import torch.nn.functional as F

    B, T = idx.shape
    cfg = model.config
    nh, hd = cfg.n_head, cfg.head_dim
    m64 = __import__("copy").deepcopy(model).double()
    cache = [([], []) for _ in m64.blocks]
    out = []
    for t in range(T):
        pos = torch.full((B, 1), t)
        x = m64.embed(idx[:, t : t + 1]).double()  # (B, 1, d)
        for blk, (ks, vs) in zip(m64.blocks, cache):
            q, k, v = blk.attn.qkv(blk.norm1(x)).view(B, 1, nh, 3 * hd).transpose(1, 2).split(hd, dim=-1)
            q, k = m64.rotary(q, pos), m64.rotary(k, pos)
            ks.append(kv_round(k))
            vs.append(kv_round(v))
            y = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))  # (B, nh, 1, hd)
            x = x + y.transpose(1, 2).reshape(B, 1, nh * hd)
            x = x + blk.mlp(blk.norm2(x))
        out.append(m64.head(m64.norm(x))[:, 0].double())
    return torch.stack(out, 1)


@needs_ext
def test_engine_bf16_cache_against_a_rounded_reference():
    model = build()  # fp32 tables and head: the only rounding is the cache's
    idx = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(5))
    want = reference_decode(model, idx, lambda t: t.to(torch.bfloat16).double())
    eng = inf.DecodeEngine(model, batch_size=3, kv_dtype=torch.bfloat16)
    got = torch.stack([eng.prefill(idx[:, :1])] + [eng.step(idx[:, t]) for t in range(1, 9)], 1)
    assert rel_err(got, want) < 1e-5
    # and the fp32 cache against the same reference without rounding
    eng32 = inf.DecodeEngine(model, batch_size=3)
    got32 = torch.stack([eng32.prefill(idx[:, :1])] + [eng32.step(idx[:, t]) for t in range(1, 9)], 1)
    assert rel_err(got32, reference_decode(model, idx, lambda t: t)) < 1e-5


@needs_ext
@pytest.mark.parametrize("tables", ["float32", "int8"])
def test_engine_greedy_generation_equals_eager(tables):
    model = build()
    if tables == "int8":
        inf.freeze(model, "int8")
    from memoryformer.generate import generate

    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    eng = inf.DecodeEngine(model, batch_size=2, kv_dtype=torch.float32)
    out = eng.generate(prompt, 20)
    assert torch.equal(out, generate(model, prompt, 20, temperature=0, kv_cache=False))
    assert inf.DecodeEngine(model, batch_size=2).kv_dtype == (torch.float32 if tables == "float32" else torch.bfloat16)


@needs_ext
def test_engine_refuses_what_it_cannot_run():
    model = build()
    eng = inf.DecodeEngine(model, max_seq_len=6)
    eng.prefill(torch.zeros(1, 4, dtype=torch.long))
    eng.step(torch.zeros(1, dtype=torch.long))
    eng.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size=1"):
        eng.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        eng.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="out of range"):
        eng.prefill(torch.full((1, 2), 300, dtype=torch.long))
    with pytest.raises(mf.MemoryFormerError, match="hash_projection"):
        inf.DecodeEngine(build(hash_projection=True))
    dense = mf.build_model(mf.get_config("micro-dense", n_layer=1, d_model=32, n_head=2, vocab_size=50))
    with pytest.raises(mf.MemoryFormerError, match="MemoryFormer"):
        inf.DecodeEngine(dense)


# ---------------------------------------------------------------------------------------------------------------
# The named engine seam: nothing in a block or its config can change the eager output without the engine seeing it


@needs_ext
def test_engine_reads_every_block_tensor_and_config_field():
    model = inf.freeze(build(), "int8", head="float32")  # tables with their scale, biases on
    cfg = model.config
    sent = engine_mod.engine_config(cfg, model, 1, cfg.max_seq_len, torch.float32)
    missing = set(cfg.fields_that_apply()) - set(sent) - set(engine_mod.CONFIG_FIELDS_ELSEWHERE)
    assert not missing, f"ModelConfig fields neither sent to the engine nor listed in CONFIG_FIELDS_ELSEWHERE: {missing}"
    assert set(engine_mod.block_tensors(model.blocks[0])) == set(model.blocks[0].state_dict())
    assert {k for k in model.state_dict() if not k.startswith("blocks.")} <= set(engine_mod.model_tensors(model))
    # a tensor the C++ side does not read is refused, not ignored
    model.blocks[1].register_buffer("gate", torch.ones(cfg.d_model))
    with pytest.raises(RuntimeError, match="block tensor 'gate' is not read by the engine"):
        inf.DecodeEngine(model)
    del model.blocks[1].gate
    ext = __import__("memoryformer.ops.cpu_ext", fromlist=["get"]).get()
    blocks = [engine_mod.block_tensors(b) for b in model.blocks]
    for extra, what in (({**sent, "new_field": 1}, "config field 'new_field'"),):
        with pytest.raises(RuntimeError, match=what):
            ext.Engine(extra, engine_mod.model_tensors(model), blocks)
    del blocks[0]["norm2.weight"]
    with pytest.raises(RuntimeError, match="norm2.weight"):
        ext.Engine(sent, engine_mod.model_tensors(model), blocks)


@needs_ext
@pytest.mark.parametrize("name", ["norm1.weight", "attn.qkv.tables", "attn.qkv.bias", "norm2.weight",
                                  "mlp.l1.tables", "mlp.l1.bias", "mlp.norm.weight", "mlp.norm.bias",
                                  "mlp.l2.tables", "mlp.l2.bias"])
def test_engine_follows_each_block_tensor(name):
    model = build()
    assert name in model.blocks[0].state_dict()
    idx = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(idx)[0]
        t = model.blocks[0].get_parameter(name)
        t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(8)) * t.abs().mean().clamp_min(0.1))
        assert not torch.allclose(model(idx)[0], before)  # the perturbation matters to the eager model ...
    check_engine(model, 2, 4, tol=2e-5)  # ... and the engine computes the same


@needs_ext
@pytest.mark.parametrize("field,value", [("weighting", "release"), ("temperature", 0.6), ("block_activation", "gelu"),
                                         ("memory_bias", False), ("bit_order", "lsb"), ("tau", 4), ("expand_bits", 1),
                                         ("rotary_pct", 0.5), ("rotary_base", 500.0), ("n_head", 2), ("n_layer", 1)])
def test_engine_follows_each_config_field(field, value):
    assert field in small_cfg().fields_that_apply()
    model = build(**{field: value})
    assert getattr(model.config, field) == value
    check_engine(model, 2, 4, tol=2e-5)


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
        mf.freeze(build(), "int4")


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
        mf.load(ck, tables="int4")


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
        inf.load_for_inference(tmp_path / "ck", tables="int4")
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
