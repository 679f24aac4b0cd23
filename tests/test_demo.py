"""`memoryformer demo`: both models train on the same tokens; the report has the table, curves and samples."""

import json

import pytest

from memoryformer.cli import main as cli_main
from memoryformer.demo import run_demo

TINY = dict(n_layer=1, d_model=32, n_head=2, max_seq_len=32)


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEMORYFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "democache"))


@pytest.mark.slow
def test_demo_report_compares_both_models_at_equal_tokens(tmp_path, cache, capsys):
    rep = run_demo(out=str(tmp_path / "demo"), tokens=20 * 4 * 32, batch_size=4, eval_tokens=256, progress=False,
                   overrides=TINY)
    out = tmp_path / "demo"
    assert [r["preset"] for r in rep["rows"]] == ["micro", "micro-dense"]
    mf_row, dense_row = rep["rows"]
    assert mf_row["tokens"] == dense_row["tokens"] == 20 * 4 * 32
    assert mf_row["table_params"] > 0 and dense_row["table_params"] == 0
    recs = {k: [json.loads(x) for x in (out / k / "metrics.jsonl").read_text().splitlines()] for k in ("mf", "dense")}
    for r, key in zip(rep["rows"], ("mf", "dense")):
        val = [x["val_loss"] for x in recs[key] if "val_loss" in x]
        assert len(val) == 5 and val[-1] < val[0]  # both learn
        assert r["val_loss"] == pytest.approx(val[-1], abs=1e-5) and r["sample"]
    # Same seed, same batches: identical data order for both models.
    assert [r["tokens"] for r in recs["mf"]] == [r["tokens"] for r in recs["dense"]]
    md = (out / "report.md").read_text()
    assert "| MemoryFormer (micro) |" in md and "| dense control (micro-dense) |" in md and "loss.png" in md
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "val PPL" in printed and f"Report: {out / 'report.md'}" in printed


def test_demo_bad_arguments_exit_2(capsys):
    for argv in (["demo", "--minutes", "0"], ["demo", "--tokens", "0"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_fits_its_token_budget_to_the_time(tmp_path, cache, capsys):
    rep = run_demo(minutes=0.75, out=str(tmp_path / "d"), batch_size=4, eval_tokens=256, progress=False, overrides=TINY)
    assert rep["tokens"] > 0 and rep["minutes"] < 3.0
    assert "training tokens per model to fit" in capsys.readouterr().out
