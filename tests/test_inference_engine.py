"""The compiled decode engine against the eager model: every precision, the bf16 cache against a rounded float64
reference, and the named seam (every block tensor and config field the eager model uses reaches the engine)."""

import pytest
import torch

import memoryformer as mf
from inference_cases import build, needs_ext, rel_err, small_cfg
from memoryformer import inference as inf
from memoryformer.inference import engine as engine_mod
from memoryformer.layers import MemoryLayer

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
@pytest.mark.parametrize("head", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize("d_model", [64, 48])  # 48: the int16 kernels' column tails (AVX-512 takes 32 at a time)
def test_engine_head_rows_do_not_depend_on_the_rows_beside_them(head, d_model):
    # the head of M rows reads each group of W rows once for all of them: every row's logits are bit for bit the
    # one-row kernel's, for any M (the kernels' passes of 1, 2 and 4 rows, and their tails) and a vocabulary that
    # is no multiple of the 4-row groups; and they are the float64 product within the head's rounding
    model = mf.freeze(build(d_model=d_model, n_head=4, vocab_size=301), tables="int8", head=head)
    eng = inf.DecodeEngine(model, batch_size=1)
    hidden = torch.randn(9, d_model, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([eng.head(hidden[i:i + 1]) for i in range(9)])
    for M in range(1, 10):
        assert torch.equal(eng.head(hidden[:M]), rows[:M]), M
    W = model.head.weight.double() * (model.head.scale.double()[:, None] if head == "int8" else 1)
    torch.testing.assert_close(rows.double(), hidden.double() @ W.T, atol=2e-3 * W.abs().max().item(), rtol=1e-3)


@needs_ext
def test_engine_rows_at_their_own_positions():
    # feed(): rows at different positions in one call (a decode step beside a prompt), each equal to that row
    # decoded alone; positions and the errors of a misuse
    model = build()
    eng, alone = inf.DecodeEngine(model, batch_size=3, kv_dtype=torch.float32), inf.DecodeEngine(model, batch_size=1)
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10]])
    first = eng.feed(torch.tensor([0, 0, 0, 0, 2, 2]), torch.cat([a[0], b[0]]), torch.tensor([0, 0, 0, 1, 0, 1]))
    assert eng.positions == [4, 0, 2] and first.shape == (2, 300)
    assert torch.equal(first[0], alone.prefill(a)[0]) and torch.equal(first[1], alone.prefill(b)[0])
    alone.prefill(a)
    nxt = eng.feed(torch.tensor([0, 1]), torch.tensor([11, 12]), torch.tensor([1, 1]))
    assert torch.equal(nxt[0], alone.step(torch.tensor([11]))[0])
    assert torch.equal(nxt[1], inf.DecodeEngine(model).prefill(torch.tensor([[12]]))[0])
    with pytest.raises(ValueError, match="pos: the rows are at different positions"):
        eng.pos
    with pytest.raises(ValueError, match="rows: expected rows in 0..2"):
        eng.feed(torch.tensor([3]), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="max_seq_len: row 0 would hold 41 positions"):
        eng.feed(torch.zeros(36, dtype=torch.long), torch.ones(36, dtype=torch.long), torch.ones(36))
    eng.set_position(0, 0)
    assert eng.positions == [0, 1, 2]


@needs_ext
@pytest.mark.parametrize("n_head", [1, 2, 4, 8])  # head_dim 64, 32, 16, 8
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_engine_prompt_attention_in_fours_is_attention_one_by_one(n_head, kv_dtype):
    # a prompt's tokens attend four at a time (each key read once for the four); tokens of two rows interleaved
    # attend one by one: the same logits bit for bit, prompts of lengths around the groups of 4 keys
    model = build(n_head=n_head)
    for T in (5, 11, 16):
        ids = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(T))
        one_by_one = inf.DecodeEngine(model, batch_size=2, kv_dtype=kv_dtype).prefill(ids)  # token-major: interleaved
        fours = inf.DecodeEngine(model, batch_size=2, kv_dtype=kv_dtype)
        rows = torch.tensor([0] * T + [1] * T)
        last = torch.zeros(2 * T, dtype=torch.bool)
        last[[T - 1, 2 * T - 1]] = True
        assert torch.equal(fours.feed(rows, ids.reshape(-1), last), one_by_one), T


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
