"""lm-evaluation-harness adapter: offline task YAMLs, registration, and agreement with our own scorer."""

import pytest

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402

import memoryformer as mf  # noqa: E402
from memoryformer import evaluate as ev  # noqa: E402
from memoryformer.evaluate import lm_eval_adapter as adapter  # noqa: E402

N_PER_TASK = 3  # the hand-made fixtures hold three examples per task


def test_registered_under_memoryformer():
    from lm_eval.api.registry import get_model

    assert get_model("memoryformer") is adapter.MemoryFormerLM


def test_task_yamls_point_at_local_files(tmp_path, bench):
    import yaml

    adapter.write_task_yamls(tmp_path, "all", bench)
    for task in ev.ALL_TASKS:
        cfg = yaml.safe_load((tmp_path / f"{task}.yaml").read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        (path,) = files.values()
        assert cfg["task"] == task and cfg["dataset_path"] == "json" and path == str(ev.task_file(task, bench).resolve())
        assert cfg["include"].endswith(".yaml")  # prompts come from lm-eval's own definition


@pytest.mark.slow
def test_lm_eval_and_our_scorer_agree(tmp_path, bench, monkeypatch, vocab_model):
    _agree(tmp_path, bench, monkeypatch, vocab_model(), N_PER_TASK)


@pytest.mark.slow
def test_lm_eval_and_our_scorer_agree_on_the_full_files(tmp_path, full_bench, monkeypatch, vocab_model):
    _agree(tmp_path, full_bench, monkeypatch, vocab_model(), 20)


def test_old_import_path_is_gone():
    import importlib.util

    assert importlib.util.find_spec("memoryformer.lm_eval_adapter") is None  # memoryformer.evaluate.lm_eval_adapter


def _agree(tmp_path, bench, monkeypatch, model, n_per_task):
    ck = mf.save_model(model, tmp_path / "ck")
    seen = {}  # (context, continuation) -> lm-eval's (log-likelihood, greedy)
    original = adapter.MemoryFormerLM.loglikelihood

    def recording(self, requests, disable_tqdm=False):
        res = original(self, requests, disable_tqdm=True)
        seen.update({tuple(r.args): x for r, x in zip(requests, res)})
        return res

    monkeypatch.setattr(adapter.MemoryFormerLM, "loglikelihood", recording)
    theirs = adapter.run_lm_eval(str(ck), "all", data_dir=bench, limit=n_per_task, progress=False)
    ours = ev.evaluate_tasks(mf.load(ck), "all", data_dir=bench, limit=n_per_task, progress=False)

    for task in ev.ALL_TASKS:
        t, o = theirs[task], ours[task]
        assert t["n"] == o["n"] == n_per_task, task
        for metric in ("acc", "acc_norm", "ppl"):
            if o.get(metric) is None:
                assert t.get(metric) is None, (task, metric)
            else:
                assert t[metric] == pytest.approx(o[metric], rel=1e-4), (task, metric)

    # request by request: the same prompt strings, the same numbers
    tok = ev.get_tokenizer()
    pairs = [p for task in ev.ALL_TASKS for d in ev.load_docs(task, bench, n_per_task) for p in d.pairs]
    assert set(pairs) == set(seen)
    mine = ev.loglikelihood(model, tok, pairs, progress=False)
    for p, (ll, greedy) in zip(pairs, mine):
        assert seen[p][0] == pytest.approx(ll, abs=2e-4) and seen[p][1] == greedy


def test_cli_harness_lm_eval(tmp_path, bench, capsys, vocab_model):
    import json

    from memoryformer.cli import main as cli_main

    torch.manual_seed(0)
    ck = mf.save_model(vocab_model(), tmp_path / "ck")
    cli_main(["eval", "--checkpoint", str(ck), "--tasks", "wsc", "--data-dir", str(bench), "--limit", "2",
              "--harness", "lm-eval", "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON object only
    assert out["wsc"]["n"] == 2 and out["wsc"]["acc_norm"] is None
