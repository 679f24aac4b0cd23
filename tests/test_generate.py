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
    for kw, name in ((dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"),
                     (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1), "temperature")):
        with pytest.raises(ValueError, match=name):
            generate(m, idx, 2, **kw)
    with pytest.raises(ValueError, match="T >= 1"):
        generate(m, idx[:, :0], 2)


def test_cli_generate(tmp_path, capsys):
    from memoryformer.cli import main
    from memoryformer.data import decode, encode

    m = mf.MemoryFormer(mf.get_config("micro", n_layer=1, d_model=32, n_head=2, tau=4))
    mf.save_model(m, tmp_path / "ck")
    main(["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0"])
    out = capsys.readouterr().out
    # exactly the library's greedy continuation of the prompt's tokens, decoded after the prompt
    want = generate(mf.load(tmp_path / "ck"), torch.tensor([encode("Hello")]), 5, temperature=0, eos_token=0)
    assert out == "Hello" + decode(want[0, 1:].tolist()) + "\n"
    for argv, msg in ((["--checkpoint", str(tmp_path / "none"), "--prompt", "x"], "not a checkpoint directory"),
                      (["--checkpoint", str(tmp_path / "ck"), "--prompt", ""], "prompt: empty"),
                      (["--checkpoint", str(tmp_path / "ck"), "--prompt", "x", "--top-k", "0"], "top_k"),
                      (["--checkpoint", str(tmp_path / "ck"), "--prompt", "x", "--temperature", "nan"], "temperature")):
        with pytest.raises(SystemExit) as e:
            main(["generate", *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err


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


def test_static_cache_in_pieces_equals_forward():
    m = model()
    idx = torch.randint(0, 50, (2, 12))
    full = m(idx)[0]
    cache = mf.KVCache.for_model(m, 2)
    k0 = cache.k.data_ptr()
    h1 = m.hidden(idx[:, :7], cache=cache)
    h2 = m.hidden(idx[:, 7:10], cache=cache)
    h3 = m.hidden(idx[:, 10:], cache=cache)
    assert cache.length == 12 and cache.k.data_ptr() == k0  # written in place, never reallocated
    torch.testing.assert_close(m.head(torch.cat((h1, h2, h3), 1)), full, atol=1e-5, rtol=1e-5)
    logits, _ = m(idx[:, :4], cache=mf.KVCache.for_model(m, 2))  # forward takes the cache too
    torch.testing.assert_close(logits, full[:, :4], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="capacity"):
        m.hidden(idx[:, :5], cache=cache)  # 12 + 5 > 16
    with pytest.raises(ValueError, match="max_seq_len"):
        m.hidden(idx[:, :1], cache=mf.KVCache.for_model(m, 2, capacity=32), pos=torch.tensor([[16], [16]]))
    perf = mf.build_model(mf.get_config("micro-dense", n_layer=1, d_model=32, n_head=2, vocab_size=50, max_seq_len=16,
                                        attention="performer"))
    assert not perf.supports_kv_cache()
    out = generate(perf.eval(), idx[:, :3], 2, temperature=0)  # falls back to the full forward
    assert out.shape == (2, 5)
    with pytest.raises(ValueError, match="no KV-cached path"):
        perf.hidden(idx[:, :3], cache=mf.KVCache.for_model(perf, 2))


def test_cache_rows_and_padding_mask_equal_separate_forwards():
    """Rows of unequal length in one padded batch (the scorer's layout) see only their own tokens."""
    m = model()
    a, b = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 3))
    idx = torch.zeros(2, 6, dtype=torch.long)
    idx[0], idx[1, :3] = a[0], b[0]
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    cache = mf.KVCache.for_model(m, 2, capacity=8)
    m.hidden(idx, cache=cache, valid=valid)
    nxt = torch.tensor([[7, 8], [9, 10]])
    two = cache.rows(torch.tensor([1, 1, 0]))  # row 1 twice, row 0 once
    h = m.hidden(nxt[[1, 1, 0]], cache=two, pos=torch.tensor([[3, 4], [3, 4], [6, 7]]))
    want_b = m(torch.cat((b, nxt[1:2]), 1))[0][0, 3:]
    want_a = m(torch.cat((a, nxt[0:1]), 1))[0][0, 6:]
    torch.testing.assert_close(m.head(h[0]), want_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.head(h[1]), want_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.head(h[2]), want_a, atol=1e-5, rtol=1e-5)


def test_token_ids_outside_the_vocabulary_are_named():
    m = model()
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        m(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="token id -1"):
        m(torch.tensor([[-1, 2]]))


def test_sample_next_keeps_the_nucleus_and_the_probabilities():
    from memoryformer.generate import sample_next

    g = torch.Generator().manual_seed(0)
    lg = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = lg.softmax(-1)[0]
    n = 20000

    def freq(**kw):
        draws = torch.cat([sample_next(lg, 1.0, kw.get("top_k"), kw.get("top_p"), g) for _ in range(n)])
        return torch.bincount(draws[:, 0], minlength=6).float() / n

    torch.testing.assert_close(freq(), p, atol=0.015, rtol=0)
    # top_p 0.8: the three most likely (0.56 + 0.21 < 0.8 <= + 0.13), renormalised
    torch.testing.assert_close(freq(top_p=0.8), torch.cat([p[:3] / p[:3].sum(), torch.zeros(3)]), atol=0.015, rtol=0)
    # top_k 4 then top_p 0.9 of the renormalised four
    q = p[:4] / p[:4].sum()
    keep = int((q.cumsum(0) - q <= 0.9).sum())
    want = torch.cat([q[:keep] / q[:keep].sum(), torch.zeros(6 - keep)])
    torch.testing.assert_close(freq(top_k=4, top_p=0.9), want, atol=0.015, rtol=0)
    # a flat distribution over many tokens: the nucleus is found by a threshold, nothing outside it is drawn
    flat = torch.randn(2, 5000, generator=torch.Generator().manual_seed(1)) * 0.1
    probs = flat.softmax(-1)
    srt = probs.sort(-1, descending=True).values
    for _ in range(200):
        tok = sample_next(flat, 1.0, None, 0.5, g)[:, 0]
        for r in range(2):
            k = int((srt[r].cumsum(0) - srt[r] <= 0.5).sum())  # the nucleus: the k most likely
            assert probs[r, tok[r]] >= srt[r, k - 1] * (1 - 1e-5)
