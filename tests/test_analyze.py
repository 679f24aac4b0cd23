"""Bucket analysis (Figure 4): per-table statistics, hit counting through hooks, files written, bad input."""

import json

import numpy as np
import pytest
import torch

import memoryformer as mf
from memoryformer import analyze
from memoryformer.cli import main as cli_main


def tiny(**kw):
    torch.manual_seed(0)
    cfg = mf.get_config("micro", **{**dict(n_layer=2, d_model=16, n_head=2, max_seq_len=16, vocab_size=50, tau=4), **kw})
    return mf.build_model(cfg).eval()


def test_table_stats_of_uniform_and_collapsed_tables():
    counts = np.array([[5, 5, 5, 5], [20, 0, 0, 0], [10, 10, 0, 0]])
    s = analyze.table_stats(counts)
    assert s["rows"] == 4 and s["tables"] == 3
    assert s["unused"] == [0.0, 0.75, 0.5]
    assert s["entropy"] == pytest.approx([1.0, 0.0, 0.5])
    assert s["max_over_mean"] == pytest.approx([1.0, 4.0, 2.0])


def test_hooks_count_every_token_in_every_table():
    model = tiny()
    tokens = np.random.default_rng(0).integers(0, 50, 500)
    counts, seen = analyze.bucket_counts(model, tokens, n_tokens=160, seq_len=16, batch_size=3, progress=False)
    assert seen == 160
    assert set(counts) == {f"block{i}.{k}" for i in range(2) for k in ("qkv", "l1", "l2")}
    assert counts["block0.qkv"].shape == (4, 16) and counts["block0.l2"].shape == (4, 64)  # l2: tau + 2 bits
    for c in counts.values():
        assert (c.sum(1) == seen).all()  # each token hits exactly one row per table
    assert not any(h for m in analyze.memory_layers(model).values() for h in m._forward_pre_hooks.values())

    # the first layer's counts equal a direct hash of its input
    layer = model.blocks[0].attn.qkv
    from memoryformer.data import eval_starts

    starts = eval_starts(len(tokens), 16, 160)
    idx = torch.tensor(np.stack([tokens[s : s + 16] for s in starts]))
    with torch.no_grad():
        codes, _ = layer.hash(model.blocks[0].norm1(model.embed(idx)))
    want = np.stack([np.bincount(codes[..., k].flatten().numpy(), minlength=16) for k in range(4)])
    assert (counts["block0.qkv"] == want).all()


def test_score_distribution_of_the_weights():
    model = tiny(weighting="paper")
    tokens = np.random.default_rng(0).integers(0, 50, 500)
    scores: dict = {}
    analyze.bucket_counts(model, tokens, n_tokens=160, seq_len=16, progress=False, scores=scores)
    layer = model.blocks[0].attn.qkv
    from memoryformer.data import eval_starts

    idx = torch.tensor(np.stack([tokens[s : s + 16] for s in eval_starts(len(tokens), 16, 160)]))
    with torch.no_grad():
        _, w = layer.hash(model.blocks[0].norm1(model.embed(idx)))
    w = w.double().flatten()
    h = scores["block0.qkv"]
    assert h["n"] == w.numel() == 160 * 4 and h["hist"].sum() == h["n"]
    st = analyze.score_stats(h)
    assert st["mean"] == pytest.approx(w.mean().item()) and st["std"] == pytest.approx(w.std(unbiased=False).item())
    assert st["min"] == pytest.approx(w.min().item()) and st["max"] == pytest.approx(w.max().item())
    # percentiles are bin edges of a log histogram (5 % wide): within one bin of the exact value
    assert st["p50"] == pytest.approx(w.median().item(), rel=0.13)
    assert 2.0**-4 <= st["min"] <= st["p01"] <= st["p50"] <= st["p99"] <= st["max"] < 1.0  # paper weighting, tau 4
    s = analyze.summarize(*analyze.bucket_counts(model, tokens, n_tokens=160, seq_len=16, progress=False), scores)
    assert s["layers"]["block1.l2"]["scores"]["p99"] > 0 and "weight p01" in analyze.format_summary(s)


def test_plots_label_their_axes_and_span_the_weights_they_show():
    model = tiny(weighting="paper")
    tokens = np.random.default_rng(0).integers(0, 50, 500)
    scores: dict = {}
    counts, _ = analyze.bucket_counts(model, tokens, n_tokens=160, seq_len=16, progress=False, scores=scores)
    fig = analyze.buckets_figure(counts)
    grid = np.array(fig.axes).reshape(2, 6)  # two blocks; first and last table of qkv, l1, l2
    assert all(ax.get_ylabel() for ax in grid[:, 0]) and all(ax.get_xlabel() for ax in grid[-1])
    fig = analyze.scores_figure(scores)
    for ax, kind in zip(fig.axes, ("qkv", "l1", "l2")):
        assert ax.get_xlabel()
        lo, hi = ax.get_xlim()
        w = [analyze.score_stats(h) for n, h in scores.items() if n.endswith("." + kind)]
        # the axis starts and ends within a few bins (12 % wide) of the smallest and largest weight, not at the
        # histogram's ends (1e-6 and 1e4)
        assert min(x["min"] for x in w) / 1.6 < lo <= min(x["min"] for x in w)
        assert max(x["max"] for x in w) <= hi < max(x["max"] for x in w) * 1.6
    assert fig.axes[0].get_ylabel()


@pytest.mark.slow
def test_analyze_checkpoint_writes_json_png_npz(tmp_path, capsys):
    ck = mf.save_model(tiny(vocab_size=50304), tmp_path / "ck")
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.train.txt").write_text("Training words here. " * 100, encoding="utf-8")
    (text / "a.val.txt").write_text("The validation text is different. " * 60, encoding="utf-8")
    s = analyze.analyze_checkpoint(ck, tmp_path / "out", data=str(text), n_tokens=64, progress=False)
    assert s["tokens"] == 64 and set(s["by_kind"]) == {"qkv", "l1", "l2"}
    for name in ("buckets.json", "buckets.png", "bucket_counts.npz", "scores.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "buckets.json").read_text())
    assert saved["layers"]["block1.l2"]["rows"] == 64
    npz = np.load(tmp_path / "out" / "bucket_counts.npz")
    assert int(npz["block0.l1"][0].sum()) == 64

    cli_main(["analyze", "--checkpoint", str(ck), "--out", str(tmp_path / "cli"), "--data", str(text),
              "--tokens", "32", "--json", "--no-progress"])
    assert json.loads(capsys.readouterr().out)["tokens"] == 32


def test_dense_model_has_no_buckets(tmp_path, capsys):
    ck = mf.save_model(mf.build_model(mf.get_config("micro-dense", n_layer=1, d_model=16, n_head=2, max_seq_len=16)),
                       tmp_path / "dense")
    with pytest.raises(SystemExit) as e:
        cli_main(["analyze", "--checkpoint", str(ck), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "no Memory Layers" in capsys.readouterr().err
