"""Table-2 baselines in the dense control: causality, exactness in limiting cases, training, config, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

import memoryformer as mf
from memoryformer import flops
from memoryformer.attention import (
    CosFormerAttention,
    LinformerAttention,
    PerformerAttention,
    causal_linear_attention,
)
from memoryformer.model import Rotary, attention

BASELINES = ["linformer", "cosformer", "performer"]


def dense(attention, **kw):
    base = dict(n_layer=2, d_model=32, n_head=2, max_seq_len=32, vocab_size=61, attention=attention,
                linformer_k=8, performer_features=16)
    return mf.get_config("micro-dense", **{**base, **kw})


@pytest.mark.parametrize("attention", BASELINES)
def test_future_tokens_never_change_earlier_outputs(attention):
    torch.manual_seed(0)
    model = mf.build_model(dense(attention)).eval()
    idx = torch.randint(0, 61, (2, 29))  # not a multiple of Linformer's block, nor of the chunk
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 3, 4, 13, 28):
            other = idx.clone()
            other[:, t] = (other[:, t] + 7) % 61
            out, _ = model(other)
            assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5), (attention, t)
            assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-5)  # ... but does change its own position on
        short, _ = model(idx[:, :11])  # a shorter sequence gives the same prefix outputs
        assert torch.allclose(short, base[:, :11], atol=1e-5)


def _naive_linear(fq, fk, v):
    a = (fq @ fk.transpose(-1, -2)).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_chunked_prefix_sums_equal_the_quadratic_form():
    torch.manual_seed(0)
    fq, fk, v = torch.rand(2, 3, 37, 5), torch.rand(2, 3, 37, 5), torch.randn(2, 3, 37, 4)
    for chunk in (1, 8, 64):
        assert torch.allclose(causal_linear_attention(fq, fk, v, chunk), _naive_linear(fq, fk, v), atol=1e-5)


def test_cosformer_equals_its_definition():
    torch.manual_seed(0)
    att = CosFormerAttention(n_head=2, max_seq_len=16, chunk=4)
    qkv = torch.randn(1, 10, 3 * 8)
    q, k, v = qkv.view(1, 10, 2, 12).transpose(1, 2).split(4, dim=-1)
    i = torch.arange(10, dtype=torch.float32)
    w = torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / 16)  # cos(pi/2 (i - j) / M)
    a = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * w
    a = a.tril()
    want = ((a @ v) / (a.sum(-1, keepdim=True) + 1e-6)).transpose(1, 2).reshape(1, 10, 8)
    assert torch.allclose(att(qkv), want, atol=1e-5)


@pytest.mark.parametrize("k", [16, 1])  # one token per block, or one block for the whole window
def test_linformer_reduces_to_softmax_attention_in_its_limits(k):
    torch.manual_seed(0)
    rot = Rotary(4, 16, 10000.0)
    att = LinformerAttention(n_head=2, max_seq_len=16, k=k, rotary=rot)
    with torch.no_grad():
        att.E.fill_(1.0)
        att.F.fill_(1.0)
    qkv = torch.randn(2, 16, 3 * 16)
    assert torch.allclose(att(qkv), attention(qkv, 2, rot), atol=1e-5)


def test_performer_features_estimate_the_softmax_kernel():
    torch.manual_seed(0)
    att = PerformerAttention(n_head=1, head_dim=8, features=4096, rotary=Rotary(0, 8, 1e4))
    q, k = 0.5 * torch.randn(1, 1, 6, 8), 0.5 * torch.randn(1, 1, 6, 8)
    fq = att._features(q, is_query=False)
    fk = att._features(k, is_query=False)
    est = fq[0, 0] @ fk[0, 0].T
    exact = torch.exp(q[0, 0] @ k[0, 0].T / math.sqrt(8))
    assert ((est - exact).abs() / exact).mean() < 0.1


@pytest.mark.parametrize("attention", BASELINES)
def test_each_baseline_trains(attention):
    torch.manual_seed(0)
    model = mf.build_model(dense(attention, n_layer=1))
    idx = torch.randint(0, 61, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    if attention == "linformer":
        assert model.blocks[0].attn.core.E.grad is not None  # the length projection learns too


def test_checkpoint_roundtrip_keeps_performer_features(tmp_path):
    torch.manual_seed(0)
    model = mf.build_model(dense("performer")).eval()
    path = mf.save_model(model, tmp_path / "ck")
    loaded = mf.load(path)
    assert loaded.config.attention == "performer"
    idx = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_softmax_default_keeps_parameter_names():
    names = {n for n, _ in mf.build_model(dense("softmax")).named_parameters()}
    assert not any(".core." in n for n in names) and "blocks.0.attn.qkv.weight" in names


def test_config_validation_names_the_field():
    with pytest.raises(mf.ConfigError, match="attention"):
        mf.get_config("micro", attention="performer")  # MemoryFormer keeps softmax attention
    with pytest.raises(mf.ConfigError, match="attention: expected one of"):
        mf.get_config("micro-dense", attention="flash")
    with pytest.raises(mf.ConfigError, match="linformer_k: expected a divisor of max_seq_len=256"):
        mf.get_config("micro-dense", attention="linformer", linformer_k=48)
    with pytest.raises(mf.ConfigError, match="performer_features"):
        mf.get_config("micro-dense", attention="performer", performer_features=0)


def test_flop_counts_of_the_baselines():
    s = 2048
    cfg = mf.get_config("pythia-410m", attention="linformer", linformer_k=64)  # blocks of 32 tokens
    assert flops.attention_variant_flops(cfg, s) == 2 * s * 1024 + 2 * s * (64 + 32) * 1024
    cfg = mf.get_config("pythia-410m", attention="performer", performer_features=128)
    assert flops.attention_variant_flops(cfg, s) == 4 * s * 128 * 1024 + 2 * s * 128 * 16
    cfg = mf.get_config("pythia-410m", attention="cosformer")
    assert flops.attention_variant_flops(cfg, s) == 4 * s * 1024 * 64 + 4 * s * 1024
    rows = {r["model"]: r for r in flops.table2()}
    assert rows["pythia-410m"]["flops_total"] == flops.paper_block_flops("transformer", 1024)["flops_total"]
    for name in ("linformer", "cosformer", "performer"):
        assert rows[name]["flops_total"] < rows["pythia-410m"]["flops_total"]
        costs = flops.layer_flops(mf.get_config("pythia-410m", attention=name))
        assert any(c.name == f"attention ({name})" for c in costs)
    assert "Table 2" in flops.report()
