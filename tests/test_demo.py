"""`memoryformer demo`: both models train on the same tokens; the budget never depends on the machine's load."""

import json

import pytest
from helpers import TINY

from memoryformer.cli import main as cli_main
from memoryformer.studies import demo as demo_mod
from memoryformer.studies.demo import budget_tokens, run_demo


@pytest.mark.slow
def test_demo_report_compares_both_models_at_equal_tokens(tmp_path, capsys):
    rep = run_demo(out=str(tmp_path / "demo"), tokens=20 * 4 * 32, batch_size=4, eval_tokens=256, progress=False,
                   overrides=TINY)
    out = tmp_path / "demo"
    assert [r["preset"] for r in rep["rows"]] == ["micro", "micro-dense"]
    mf_row, dense_row = rep["rows"]
    assert mf_row["tokens"] == dense_row["tokens"] == rep["tokens"] == 20 * 4 * 32
    assert mf_row["table_params"] > 0 and dense_row["table_params"] == 0
    recs = {k: [json.loads(x) for x in (out / k / "metrics.jsonl").read_text().splitlines()] for k in ("mf", "dense")}
    for r, key in zip(rep["rows"], ("mf", "dense")):
        val = [x["val_loss"] for x in recs[key] if "val_loss" in x]
        assert len(val) == 5 and val[-1] < val[0]  # five milestones, both learn
        assert r["val_loss"] == pytest.approx(val[-1], abs=1e-5) and r["sample"]
        assert (out / key / "final" / "model.safetensors").is_file()  # always a final/ checkpoint
    # Same seed, same batches: identical data order for both models.
    assert [r["tokens"] for r in recs["mf"]] == [r["tokens"] for r in recs["dense"]]
    md = (out / "report.md").read_text()
    assert "| MemoryFormer (micro) |" in md and "| dense control (micro-dense) |" in md and "loss.png" in md
    assert "**At 2,560 tokens per model this comparison is inconclusive" in md and not rep["conclusive"]
    assert f"Validation: {rep['eval_tokens']:,} tokens" in md and "--max-tokens" in md  # which windows were scored
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "val PPL" in printed and f"Report: {out / 'report.md'}" in printed


def test_demo_eval_command_reproduces_its_validation(tmp_path, capsys, corpus):
    """The report's `memoryformer eval` line scores the same windows, so it prints the same perplexity."""
    rep = run_demo(out=str(tmp_path / "d"), data=str(corpus), tokens=4 * 4 * 32, batch_size=4, eval_tokens=128,
                   progress=False, overrides=TINY)
    ck = rep["rows"][0]["checkpoint"]
    md = (tmp_path / "d" / "report.md").read_text()
    val_file = corpus / "toy.val.jsonl"  # the folder's validation split
    assert f"--data {val_file} --max-tokens {rep['eval_tokens']}" in md  # the line the report prints
    cli_main(["eval", "--checkpoint", ck, "--data", str(val_file), "--max-tokens", str(rep["eval_tokens"]),
              "--seq-len", "32", "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == rep["eval_tokens"] and out["ppl"] == pytest.approx(rep["rows"][0]["val_ppl"], rel=1e-5)


def test_eval_source_is_the_validation_text(corpus, tmp_path):
    assert demo_mod.eval_source(None) == demo_mod.eval_source("sample") == "sample"
    assert demo_mod.eval_source(str(corpus)) == str(corpus / "toy.val.jsonl")
    assert demo_mod.eval_source("hf:wikitext:wikitext-2-raw-v1") == "hf:wikitext:wikitext-2-raw-v1"
    one = tmp_path / "books.jsonl"
    one.write_text('{"text": "a"}\n', encoding="utf-8")
    assert demo_mod.eval_source(str(one)) is None  # its validation is the file's last 1 %: no file to name


def test_budget_comes_from_the_idle_calibration_not_from_timing(monkeypatch):
    a = budget_tokens(10, ["micro", "micro-dense"], 8, 256)
    assert a % (8 * 256) == 0 and 300_000 < a < 1_000_000
    assert budget_tokens(20, ["micro", "micro-dense"], 8, 256) > 1.9 * a  # twice the minutes, twice the tokens
    monkeypatch.setitem(demo_mod.IDLE_TOKENS_PER_S, "micro", 1050.0)  # a slower model gets fewer tokens
    assert budget_tokens(10, ["micro", "micro-dense"], 8, 256) < a


def test_demo_bad_arguments_exit_2(capsys):
    for argv in (["demo", "--minutes", "0"], ["demo", "--tokens", "0"], ["demo", "--minutes", "nan"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2 and "error:" in capsys.readouterr().err
