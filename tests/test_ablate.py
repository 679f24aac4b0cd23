"""Ablation suites: valid configs, equal budgets, the ordering check, reuse of finished runs, tables, CLI."""

import json
import math
from pathlib import Path

import pytest

import memoryformer as mf
from memoryformer.cli import main as cli_main
from memoryformer.config import DENSE_CONTROL
from memoryformer.studies import ablate


@pytest.mark.parametrize("scale", ["micro", "tiny"])
def test_every_variant_is_a_valid_config(scale):
    s = ablate.suites(scale)
    assert set(s) == set(ablate.SUITE_NAMES)
    for suite in s.values():
        names = [v.name for v in suite.variants]
        assert len(set(names)) == len(names)
        for v in suite.variants:
            cfg = ablate.variant_config(scale, v)
            assert cfg.arch == ("transformer" if v.dense else "memoryformer")
    tau10 = mf.get_config(scale, **s["tau"].variants[2].model)
    assert tau10.tau == 10 and tau10.d_model % 10 == 0 and tau10.d_model <= mf.get_config(scale).d_model
    assert [v.model["expand_bits"] for v in s["expand-bits"].variants] == [0, 1, 2, 3]
    assert [v.train["lr"] for v in s["lr"].variants] == [1e-3, 2e-3, 3e-3, 4e-3]
    att = [ablate.variant_config(scale, v) for v in s["attention"].variants]
    assert [c.attention for c in att] == ["softmax", "linformer", "cosformer", "performer", "softmax"]
    assert att[0] == mf.get_config(DENSE_CONTROL[scale]) and att[-1] == mf.get_config(scale, weighting="release")
    # the suites' baseline keeps the release weighting of their committed tables; the weighting suite sets its own
    assert {ablate.variant_config(scale, v).weighting for v in s["tau"].variants} == {"release"}
    assert [ablate.variant_config(scale, v).weighting for v in s["weighting"].variants] == [
        "release", "paper", "paper", "release"]
    # the efficient attentions cost fewer FLOPs per block than softmax at the paper's s = 2048, as in Table 2
    assert all(ablate.block_flops(c) < ablate.block_flops(att[0]) for c in att[1:4])
    with pytest.raises(mf.MemoryFormerError, match="dense preset"):
        ablate.suites("micro-dense")


def test_ordering_against_the_papers_numbers():
    suite = ablate.suites()["expand-bits"]
    rows = [dict(name=v.name, paper=v.paper, val_ppl=p) for v, p in zip(suite.variants, (30.0, 29.0, 28.0, 27.0))]
    o = ablate.ordering(suite, rows)
    assert o["holds"] and o["pairs_agree"] == o["pairs"] == 6 and o["best_ours"] == o["best_paper"] == "bits=3"
    rows[0]["val_ppl"] = 26.0  # 0 bits now best: three pairs flip
    o = ablate.ordering(suite, rows)
    assert not o["holds"] and o["pairs_agree"] == 3 and o["best_ours"] == "bits=0"
    gelu = ablate.suites()["gelu"]  # the paper's metric there is accuracy: higher is better
    o = ablate.ordering(gelu, [dict(name="no activation", paper=0.404, val_ppl=20.0), dict(name="GeLU", paper=0.402, val_ppl=21.0)])
    assert o["holds"] and o["best_paper"] == "no activation"
    assert ablate.ordering(ablate.suites()["weighting"], [dict(name="release, t=1", paper=None, val_ppl=5.0)])["holds"] is None


@pytest.fixture
def fake_train(monkeypatch):
    """Replace training by a summary whose PPL depends on the config, and record the calls."""
    import memoryformer.train as train_mod

    calls = []

    def fake(cfg, tcfg):
        calls.append((cfg, tcfg))
        ppl = 20.0 - cfg.expand_bits + (tcfg.lr or 0.0)
        summary = dict(stopped_by="done", val_loss=math.log(ppl), val_ppl=ppl,
                       tokens=tcfg.max_tokens, steps=3, tokens_per_s=1000.0, checkpoint=f"{tcfg.out}/final", params={})
        Path(tcfg.out).mkdir(parents=True, exist_ok=True)
        Path(tcfg.out, "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(train_mod, "train", fake)
    return calls


def test_run_suite_trains_each_variant_at_equal_tokens_and_reuses_finished_runs(tmp_path, fake_train):
    res = ablate.run_suite("expand-bits", tokens=5000, out=tmp_path / "runs", results_dir=tmp_path / "res", log=lambda m: None)
    assert len(fake_train) == 4
    assert {t.max_tokens for _, t in fake_train} == {5000} and len({t.seed for _, t in fake_train}) == 1
    assert len({t.data for _, t in fake_train}) == 1 and len({t.out for _, t in fake_train}) == 4
    assert [c.expand_bits for c, _ in fake_train] == [0, 1, 2, 3]
    assert res["complete"] and res["ordering"]["holds"]
    md = (tmp_path / "res" / "ablations_expand_bits_micro.md").read_text()
    assert "| bits=2 | 18.82 | 18.000 |" in md and "holds" in md
    assert json.loads((tmp_path / "res" / "ablations_expand_bits_micro.json").read_text())["tokens_per_variant"] == 5000

    ablate.run_suite("expand-bits", tokens=5000, out=tmp_path / "runs", log=lambda m: None)
    assert len(fake_train) == 4  # nothing retrained
    ablate.run_suite("expand-bits", tokens=6000, out=tmp_path / "runs", log=lambda m: None, only=["bits=1"])
    assert len(fake_train) == 5  # a different budget is a different run


def test_lr_suite_sets_the_peak_lr(tmp_path, fake_train):
    ablate.run_suite("lr", tokens=100, out=tmp_path, log=lambda m: None)
    assert [t.lr for _, t in fake_train] == [1e-3, 2e-3, 3e-3, 4e-3]


def test_attention_suite_trains_the_dense_control_with_each_attention(tmp_path, fake_train):
    res = ablate.run_suite("attention", tokens=100, out=tmp_path / "runs", results_dir=tmp_path / "res", log=lambda m: None)
    assert [(c.arch, c.attention) for c, _ in fake_train] == [
        ("transformer", "softmax"), ("transformer", "linformer"), ("transformer", "cosformer"),
        ("transformer", "performer"), ("memoryformer", "softmax")]
    assert [t.lr for _, t in fake_train] == [None] * 5  # each model's default LR (MemoryFormer: 3x the dense one)
    flops = [r["block_flops"] for r in res["variants"]]
    assert flops[0] == ablate.block_flops(mf.get_config("micro-dense")) and min(flops[1:4]) > 0
    md = (tmp_path / "res" / "ablations_attention_micro.md").read_text()
    assert "### Table 2: `attention`" in md and "Pythia-410M / MF-base" in md
    assert f"| {flops[0] / 1e9:.3g} G |" in md


def test_cli_ablate(tmp_path, fake_train, capsys):
    cli_main(["ablate", "--suite", "gelu", "--tokens", "100", "--out", str(tmp_path), "--json", "--no-progress"])
    res = json.loads(capsys.readouterr().out)
    assert res["suite"] == "gelu" and [v["name"] for v in res["variants"]] == ["no activation", "GeLU"]
    with pytest.raises(SystemExit) as e:
        cli_main(["ablate", "--suite", "depth", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown suite 'depth'" in capsys.readouterr().err
