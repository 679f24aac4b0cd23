import pytest
import torch

import memoryformer as mf
from memoryformer.generate import generate


def model():
    torch.manual_seed(0)
    return mf.MemoryFormer(mf.get_config("micro", n_layer=1, d_model=32, n_head=2, tau=4, vocab_size=50, max_seq_len=16)).eval()


def test_greedy_matches_argmax_and_crops_context():
    m = model()
    idx = torch.randint(0, 50, (2, 5))
    out = generate(m, idx, 20, temperature=0)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], idx)
    for t in (5, 12, 24):  # each new token is the argmax given the (cropped) context before it
        ctx = out[:, max(0, t - 16) : t]
        assert torch.equal(out[:, t], m(ctx)[0][:, -1].argmax(-1))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    m = model()
    idx = torch.randint(0, 50, (3, 4))
    a = generate(m, idx, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(m, idx, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(generate(m, idx, 6, top_k=1), generate(m, idx, 6, temperature=0))
    assert torch.equal(generate(m, idx, 6, top_p=1e-6), generate(m, idx, 6, temperature=0))


def test_stops_at_eos_and_rejects_bad_arguments():
    m = model()
    idx = torch.randint(0, 50, (1, 4))
    first = generate(m, idx, 1, temperature=0)[0, -1].item()
    out = generate(m, idx, 10, temperature=0, eos_token=first)
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, idx, 2, top_p=0)


def test_cli_generate(tmp_path, capsys):
    from memoryformer.cli import main

    torch.manual_seed(0)
    mf.save_model(mf.MemoryFormer(mf.get_config("micro", n_layer=1, d_model=32, n_head=2, tau=4)), tmp_path / "ck")
    main(["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"])
    assert e.value.code == 2 and "not a checkpoint directory" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["memoryformer", "transformer"])
def test_kv_cache_generates_what_the_full_forward_does(arch):
    torch.manual_seed(0)
    kw = dict(n_layer=2, d_model=32, n_head=2, vocab_size=50, max_seq_len=16)
    m = mf.build_model(mf.get_config("micro", tau=4, **kw) if arch == "memoryformer" else mf.get_config("micro-dense", **kw)).eval()
    idx = torch.randint(0, 50, (3, 5))
    # greedy and sampled, past max_seq_len (the window then slides)
    for extra in (dict(temperature=0), dict(temperature=1.0, top_k=10)):
        a = generate(m, idx, 20, kv_cache=True, generator=torch.Generator().manual_seed(3), **extra)
        b = generate(m, idx, 20, kv_cache=False, generator=torch.Generator().manual_seed(3), **extra)
        assert torch.equal(a, b)


def test_forward_cached_in_pieces_equals_forward():
    torch.manual_seed(0)
    m = model()
    idx = torch.randint(0, 50, (2, 12))
    full = m.head(m.forward_cached(idx, torch.arange(12).expand(2, 12))[0])
    torch.testing.assert_close(full, m(idx)[0], atol=1e-5, rtol=1e-5)
    h1, kv = m.forward_cached(idx[:, :7], torch.arange(7).expand(2, 7))
    h2, _ = m.forward_cached(idx[:, 7:], torch.arange(7, 12).expand(2, 5), kv)
    torch.testing.assert_close(m.head(torch.cat((h1, h2), 1)), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        m.forward_cached(idx[:, :1], torch.tensor([[16], [16]]))
    perf = mf.build_model(mf.get_config("micro-dense", n_layer=1, d_model=32, n_head=2, vocab_size=50, max_seq_len=16,
                                        attention="performer"))
    assert not perf.supports_kv_cache()
    out = generate(perf.eval(), idx[:, :3], 2, temperature=0)  # falls back to the full forward
    assert out.shape == (2, 5)
    with pytest.raises(ValueError, match="no KV-cached path"):
        perf.forward_cached(idx[:, :3], torch.arange(3).expand(2, 3))
