"""int4 rows (two values per byte, one float16 scale per group of G values): packing, the error bound, the three
consumers (Memory Layer lookup, head, embedding) against float64 references, freeze / save / load / the streaming
loader, the command line, and the decode engine's refusal.

The bound tested: symmetric absmax rounding with the stored (float16, rounded-up) scale s of a group gives
|s * q - x| <= s / 2 for every value x of the group (up to float32 division, a relative 2^-20 here).
"""

import copy

import pytest
import torch
import torch.nn as nn

import memoryformer as mf
from inference_cases import build
from memoryformer import inference as inf
from memoryformer.inference import engine as engine_mod
from memoryformer.layers import MemoryLayer
from memoryformer.ops.int4 import (
    dequantize_int4,
    group_count,
    group_of,
    int4_lookup,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from memoryformer.ops.reference import lookup_reference

GROUPS = (32, 64, 128, None)  # None: one scale per row


def _widths() -> dict[str, set[int]]:
    """Row widths of the presets' tables (Q/K/V, the Memory Block's two layers) and of the head and embedding."""
    out = {"tables": set(), "rows": set()}
    for name in ("micro", "tiny", "small", "base"):
        cfg = mf.get_config(name)
        d, K = cfg.d_model, cfg.d_model // cfg.tau
        out["tables"] |= {3 * d, (cfg.tau + cfg.expand_bits) * K, d}
        out["rows"].add(d)  # the head's (V, d) and the embedding's (V, d) rows, packed along d
    return out


def _scales_per_value(scale: torch.Tensor, h: int) -> torch.Tensor:
    return scale.double().repeat_interleave(group_of(h, scale.shape[-1]), -1)[..., :h]


def test_pack_unpack_every_nibble_at_both_positions():
    pairs = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8)  # (256, 2): (even, odd)
    p = pack_int4(pairs)
    assert p.dtype == torch.uint8 and p.shape == (256, 1)
    assert torch.equal(p[:, 0].long(), (pairs[:, 0] + 8).long() | ((pairs[:, 1] + 8).long() << 4))  # low = even
    assert sorted(p[:, 0].tolist()) == list(range(256))
    assert torch.equal(unpack_int4(p), pairs)
    row = pairs.reshape(1, -1)  # one row of 512 values
    assert torch.equal(unpack_int4(pack_int4(row)), row)
    with pytest.raises(ValueError, match="even width"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="even width"):
        quantize_int4(torch.randn(2, 7), 32)


def test_groups_and_ragged_rows():
    # a width that is no multiple of G ends in a shorter group; G is read back from the count of groups
    for h in (128, 160, 384, 1280, 3072):
        for g in GROUPS:
            n = group_count(h, g)
            assert n == (1 if g is None or g >= h else -(-h // g))
            assert group_of(h, n) == (h if n == 1 else g)
    x = torch.randn(5, 160, dtype=torch.float64)
    p, s = quantize_int4(x, 64)
    assert s.shape == (5, 3) and s.dtype == torch.float16
    q = unpack_int4(p)
    assert int(q.abs().max()) <= 7  # the code -8 is never used
    want = q.double() * _scales_per_value(s, 160)  # the float64 dequantised reference
    assert torch.equal(dequantize_int4(p, s, torch.float64), want)
    assert torch.equal(dequantize_int4(p, s).double(), want)  # q * fp16 scale is exact in float32
    for bad in (3, 0.5, True, -64):
        with pytest.raises(ValueError, match="group_size"):
            quantize_int4(x, bad)


@pytest.mark.parametrize("group", GROUPS)
def test_int4_rows_within_half_a_step_for_every_preset_width(group):
    torch.manual_seed(0)
    w = _widths()
    for h in sorted(w["tables"] | w["rows"]):
        x = torch.randn(6, h) * torch.rand(6, 1) * 0.1  # rows of different magnitudes
        x[0, : h // 3] = 0.0  # an all-zero group
        x[1, 5] = 3.0  # one outlier
        p, s = quantize_int4(x, group)
        err = (dequantize_int4(p, s, torch.float64) - x.double()).abs()
        step = _scales_per_value(s, h)
        assert bool((err <= step / 2 * (1 + 2**-20)).all()), h
        # the float16 scale is rounded up, never down: no value lies beyond +-7 steps (none is clipped)
        assert bool((x.double().abs() <= 7 * step).all())


def test_int4_lookup_head_and_embedding_against_float64_references():
    torch.manual_seed(0)
    w = _widths()
    for h in sorted(w["tables"]):  # tables (K, R, h) with few rows: only the width matters for packing
        K, R, N = 3, 16, 11
        p, s = quantize_int4(torch.randn(K, R, h) * 0.02, 64)
        codes, weights = torch.randint(0, R, (N, K)), torch.rand(N, K)
        ref = lookup_reference(codes, weights.double(), dequantize_int4(p, s, torch.float64))
        got = int4_lookup(codes, weights, p, s)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(int4_lookup(codes, weights.double(), p, s), ref, rtol=1e-12, atol=0)
        y = mf.ops.memory_lookup(codes, weights, p, torch.ones(h), scale=s)  # through the dispatch, with a bias
        torch.testing.assert_close(y.double(), ref + 1, rtol=1e-5, atol=1e-6)
    for d in sorted(w["rows"]):
        lin, emb = nn.Linear(d, 37, bias=False), nn.Embedding(37, d)
        head = inf.QuantizedLinear.from_float(lin, "int4", group_size=64)
        x = torch.randn(2, 5, d)
        wq = dequantize_int4(head.weight, head.scale, torch.float64)
        torch.testing.assert_close(head(x).double(), x.double() @ wq.T, rtol=1e-5, atol=1e-5)
        e = inf.QuantizedEmbedding.from_float(emb, "int4", group_size=64)
        idx = torch.tensor([[0, 36, 5], [5, 5, 1]])
        assert torch.equal(e(idx).double(), dequantize_int4(e.weight, e.scale, torch.float64)[idx])
        assert set(e.state_dict()) == {"weight", "scale"} and e.weight.shape == (37, d // 2)


def _float64_twin(model: nn.Module, frozen: nn.Module) -> nn.Module:
    """A float64 copy of `model` holding `frozen`'s dequantised tables, head and embedding."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for (_, a), (_, b) in zip(ref.named_modules(), frozen.named_modules()):
            if isinstance(a, MemoryLayer):
                a.tables.copy_(dequantize_int4(b.tables, b.scale, torch.float64))
        for name in ("head", "embed"):
            q = getattr(frozen, name)
            getattr(ref, name).weight.copy_(dequantize_int4(q.weight, q.scale, torch.float64))
    return ref


def test_frozen_int4_model_equals_the_float64_reference_of_its_weights():
    model = build()
    frozen = inf.freeze(copy.deepcopy(model), "int4", head="int4", huge_pages=False)
    assert frozen.blocks[0].attn.qkv.tables.dtype == torch.uint8 and frozen.blocks[0].mlp.l1.group_size == 64
    ref = _float64_twin(model, frozen)
    idx = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = frozen(idx)[0], ref(idx)[0]
    # fp32 activations and sums against float64 ones; no hash sign flips at this seed
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert inf.default_head("int4") == "int8"
    mixed = inf.freeze(copy.deepcopy(model), "int4", huge_pages=False)  # int4 tables, int8 head and embedding
    assert mixed.head.weight.dtype == torch.int8 and inf.inference_metadata(mixed) == {
        inf.TABLES_KEY: "int4-g64/float32", inf.HEAD_KEY: "int8/int8"}


@pytest.mark.parametrize("tables,head,group", [("int4", "int8", 64), ("int4", "int4", 32), ("int8", "int4", None)])
def test_save_load_round_trip_and_the_streaming_loader(tmp_path, monkeypatch, tables, head, group):
    from memoryformer.inference import loader

    model = build()
    mf.save_model(model, tmp_path / "ck")
    frozen = inf.freeze(copy.deepcopy(model), tables, head=head, group_size=group, huge_pages=False)
    want = frozen.state_dict()
    mf.save_model(frozen, tmp_path / "q")
    again = mf.load(tmp_path / "q")  # frozen in the file: rebuilt as it is
    got = again.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    monkeypatch.setattr(loader, "CHUNK_BYTES", 4096)  # many chunks per tensor
    streamed = inf.load_for_inference(tmp_path / "ck", tables=tables, head=head, group_size=group)
    got = streamed.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # an int4 file converted on the way in: int4 -> int8 tables equals freezing the dequantised tables
    conv = inf.load_for_inference(tmp_path / "q", tables="float32", head="float32")
    qkv = frozen.blocks[0].attn.qkv
    want_t = dequantize_int4(qkv.tables, qkv.scale) if qkv.tables.dtype == torch.uint8 else qkv.tables.float() * qkv.scale[..., None]
    assert torch.equal(conv.blocks[0].attn.qkv.tables, want_t)


def test_int4_tag_in_the_file_must_be_known(tmp_path):
    from safetensors.torch import load_file, save_file

    mf.save_model(inf.freeze(build(), "int4", huge_pages=False), tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    save_file(load_file(f), f, metadata={"format": "pt", inf.TABLES_KEY: "int4-g48/float32"})
    with pytest.raises(mf.MemoryFormerError, match="unknown memoryformer.inference_tables 'int4-g48/float32'"):
        mf.load(tmp_path / "q", verify=False)


def test_engine_refuses_int4_and_generate_falls_back_to_eager(tmp_path):
    from memoryformer.generate import generate

    model = inf.freeze(build(), "int4", huge_pages=False)
    assert inf.DecodeEngine.why_not(model) == "int4 tables: the compiled engine reads int8/bf16/fp16/fp32 rows"
    with pytest.raises(mf.MemoryFormerError, match="int4 tables"):
        inf.DecodeEngine(model)
    assert "int4 head" in inf.DecodeEngine.why_not(inf.freeze(build(), "int8", head="int4", huge_pages=False))
    prompt = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    fast = generate(model, prompt, 12, temperature=0)
    assert model not in engine_mod._ENGINES and torch.equal(fast, generate(model, prompt, 12, temperature=0, engine=False))
    from memoryformer.serve import slot_engine_for

    assert slot_engine_for(model, 2).kind != "engine"


def test_cli_export_and_generate_with_int4_tables(tmp_path, capsys):
    from memoryformer.cli import main as cli_main

    mf.save_model(build(vocab_size=50304), tmp_path / "ck")
    cli_main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "q"), "--tables", "int4"])
    assert "tables int4" in capsys.readouterr().out
    loaded = mf.load(tmp_path / "q")
    assert loaded.blocks[0].attn.qkv.tables.dtype == torch.uint8 and loaded.head.weight.dtype == torch.int8
    args = ["--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0"]
    cli_main(["generate", "--checkpoint", str(tmp_path / "ck"), "--tables", "int4", *args])
    a = capsys.readouterr().out
    cli_main(["generate", "--checkpoint", str(tmp_path / "q"), *args])
    assert a == capsys.readouterr().out and a.startswith("Hello")


def test_every_command_with_tables_takes_int4():
    from memoryformer.cli import build_parser

    p = build_parser()
    for argv in (["generate", "--checkpoint", "c", "--prompt", "x"], ["export", "--checkpoint", "c", "--out", "o"],
                 ["eval", "--checkpoint", "c"], ["serve", "--checkpoint", "c"]):
        assert p.parse_args([*argv, "--tables", "int4"]).tables == "int4"
