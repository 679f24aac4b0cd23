"""MemoryFormer and its dense control: construction, wiring, init, learning."""

import math

import pytest
import torch

import memoryformer as mf
from memoryformer.layers import small_init_std


def tiny(arch="memoryformer", **kw):
    base = dict(n_layer=2, d_model=32, n_head=2, max_seq_len=32, vocab_size=64, tau=4)
    base.update(kw)
    return mf.get_config("micro" if arch == "memoryformer" else "micro-dense", **base)


@pytest.mark.parametrize("name", mf.preset_names())
def test_every_preset_forward_backward_on_meta(name):
    cfg = mf.get_config(name)
    with torch.device("meta"):
        model = mf.build_model(cfg)
    idx = torch.zeros(2, 16, dtype=torch.long, device="meta")
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (2, 16, cfg.vocab_size) and loss.shape == ()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["micro", "micro-dense"])
def test_micro_forward_backward_for_real(name):
    torch.manual_seed(0)
    model = mf.build_model(mf.get_config(name))
    idx = torch.randint(0, 50304, (2, 64))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (2, 64, 50304)
    assert abs(loss.item() - math.log(50304)) < 1.0  # a fresh model is close to uniform
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model(idx)[1] is None


def test_memoryformer_wiring():
    with torch.device("meta"):
        model = mf.MemoryFormer(mf.get_config("tiny"))
    block = model.blocks[0]
    assert isinstance(block.norm1, torch.nn.RMSNorm) and isinstance(block.norm2, torch.nn.RMSNorm)
    assert block.attn.qkv.tables.shape == (64, 256, 3 * 512)  # shared-hash Q/K/V, one fused table
    assert not hasattr(block.attn, "proj")  # no output projection
    assert block.mlp.l1.tables.shape == (64, 256, 640) and block.mlp.l2.tables.shape == (64, 1024, 512)
    assert isinstance(block.mlp.norm, torch.nn.LayerNorm)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [model.head]  # the LM head is the only fully-connected layer left
    assert model.head.weight is not model.embed.weight  # untied
    assert model.rotary.dims == 16  # 25 % of 64 head dims


def test_num_params_tiny_matches_the_paper_shapes():
    with torch.device("meta"):
        model = mf.MemoryFormer(mf.get_config("tiny"))
    n = model.num_params()
    b = model.blocks[0]
    # MF-tiny (paper §3.1: tau 8, K 64; Table 5, 2 expanding bits): Q, K, V each 64 x 256 x 512; Block-L1
    # 64 x 256 x 640; Block-L2 64 x 1024 x 512 = 69.2 M per block
    assert tuple(b.attn.qkv.tables.shape) == (64, 256, 3 * 512)
    assert tuple(b.mlp.l1.tables.shape) == (64, 256, 640) and tuple(b.mlp.l2.tables.shape) == (64, 1024, 512)
    assert sum(m.tables.numel() for m in (b.attn.qkv, b.mlp.l1, b.mlp.l2)) == 69_206_016
    assert n["table"] == 6 * 69_206_016
    assert n["table_bytes"] == 4 * n["table"]
    assert n["total"] == n["dense"] + n["table"]
    with torch.device("meta"):
        assert mf.Transformer(mf.get_config("pythia-70m")).num_params()["total"] == 70_426_624  # Pythia-70M


def test_meta_init_matches_eager_init_statistics():
    torch.manual_seed(0)
    cfg = mf.get_config("micro")
    with torch.device("meta"):
        model = mf.MemoryFormer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    b = model.blocks[0]
    assert abs(b.attn.qkv.tables.std().item() - small_init_std(128)) < 2e-3
    assert abs(b.mlp.l1.tables.std().item() - 0.02) < 1e-3
    assert abs(b.mlp.l2.bias.std().item() - 0.001) < 5e-4
    assert torch.equal(b.norm1.weight, torch.ones(128))
    assert torch.equal(b.mlp.norm.bias, torch.zeros(160))
    # rotary buffers are rebuilt, so outputs equal an eagerly built model's with the same weights
    eager = mf.MemoryFormer(cfg)
    eager.load_state_dict(model.state_dict())
    idx = torch.randint(0, 50304, (1, 20))
    torch.testing.assert_close(model(idx)[0], eager(idx)[0])


@pytest.mark.parametrize("arch", ["memoryformer", "transformer"])
def test_causal(arch):
    torch.manual_seed(0)
    model = mf.build_model(tiny(arch)).eval()
    idx = torch.randint(0, 64, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % 64
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("arch", ["memoryformer", "transformer"])
def test_overfits_one_batch(arch):
    torch.manual_seed(0)
    lr = 3e-3 if arch == "memoryformer" else 1e-3
    model = mf.build_model(tiny(arch, n_layer=2, d_model=64, tau=8, vocab_size=128))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    idx = torch.randint(0, 128, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    first = model(x, y)[1].item()
    for _ in range(80):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first, (first, loss.item())


@pytest.mark.parametrize("expand_bits", [0, 1, 2, 3])
def test_expand_bits_and_activation_variants(expand_bits):
    cfg = tiny(expand_bits=expand_bits, block_activation="gelu", weighting="paper", temperature=0.5)
    model = mf.MemoryFormer(cfg)
    assert model.blocks[0].mlp.l2.tau == 4 + expand_bits
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU)
    _, loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()


def test_bad_model_input():
    model = mf.MemoryFormer(tiny())
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 4))
    with pytest.raises(mf.ConfigError, match="arch"):
        mf.Transformer(tiny())


def test_param_groups_put_tables_apart():
    model = mf.MemoryFormer(tiny())
    groups = {g["name"]: g for g in model.param_groups(weight_decay=0.1, table_weight_decay=0.0)}
    assert groups["tables"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == model.num_params()["total"]
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])


def test_save_and_load_roundtrip(tmp_path):
    model = mf.MemoryFormer(tiny()).eval()
    mf.save_model(model, tmp_path / "ck")
    loaded = mf.load(tmp_path / "ck")
    assert loaded.config == model.config
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    with pytest.raises(mf.MemoryFormerError, match="not a checkpoint directory"):
        mf.load(tmp_path / "missing")


def test_bit_order_and_hash_projection_options(tmp_path):
    from memoryformer.flops import block_flops

    base = tiny()
    for kw in ({"bit_order": "lsb"}, {"hash_projection": True}):
        cfg = mf.get_config("micro", **{**base.to_dict(), **kw, "arch": "memoryformer"})
        model = mf.MemoryFormer(cfg)
        layers = [m for m in model.modules() if isinstance(m, mf.MemoryLayer)]
        assert layers and all(m.bit_order == cfg.bit_order and (m.proj is not None) == cfg.hash_projection for m in layers)
        idx = torch.randint(0, 64, (2, 10))
        _, loss = model(idx, idx)
        loss.backward()
        assert torch.isfinite(loss)
        mf.save_model(model.eval(), tmp_path / str(kw))
        assert torch.equal(mf.load(tmp_path / str(kw))(idx)[0], model(idx)[0])  # also rebuilt on meta + init
    projected = mf.get_config("micro", **{**base.to_dict(), "hash_projection": True})
    d, hid = base.d_model, base.block_hidden
    assert block_flops(projected) - block_flops(base) == 2048 * (2 * d * d + hid * hid)
    extra = mf.MemoryFormer(projected).num_params()["dense"] - mf.MemoryFormer(base).num_params()["dense"]
    assert extra == base.n_layer * (2 * (d * d + d) + hid * hid + hid)  # three Linear(in, in) per block
    with pytest.raises(mf.ConfigError, match="bit_order"):
        mf.get_config("micro", bit_order="lsb-first")
    with pytest.raises(mf.ConfigError, match="hash_projection"):
        mf.get_config("micro", hash_projection="yes")
