"""lm-evaluation-harness adapter: offline task YAMLs, registration, and agreement with our own scorer."""

import pytest

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402

import memoryformer as mf  # noqa: E402
from memoryformer import evaluate as ev  # noqa: E402
from memoryformer import lm_eval_adapter as adapter  # noqa: E402
from test_evaluate import vocab_model, write_benchmarks  # noqa: E402

N_PER_TASK = 3


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The real benchmark files when present (../shared/data/eval), else the hand-made examples."""
    return ev.default_data_dir() or write_benchmarks(tmp_path_factory.mktemp("eval"))


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
def test_lm_eval_and_our_scorer_agree(tmp_path, bench, monkeypatch):
    model = vocab_model()
    ck = mf.save_model(model, tmp_path / "ck")
    seen = {}  # (context, continuation) -> lm-eval's (log-likelihood, greedy)
    original = adapter.MemoryFormerLM.loglikelihood

    def recording(self, requests, disable_tqdm=False):
        res = original(self, requests, disable_tqdm=True)
        seen.update({tuple(r.args): x for r, x in zip(requests, res)})
        return res

    monkeypatch.setattr(adapter.MemoryFormerLM, "loglikelihood", recording)
    theirs = adapter.run_lm_eval(str(ck), "all", data_dir=bench, limit=N_PER_TASK, progress=False)
    ours = ev.evaluate_tasks(mf.load(ck), "all", data_dir=bench, limit=N_PER_TASK, progress=False)

    for task in ev.ALL_TASKS:
        t, o = theirs[task], ours[task]
        assert t["n"] == o["n"] == N_PER_TASK, task
        for metric in ("acc", "acc_norm", "ppl"):
            if o.get(metric) is None:
                assert t.get(metric) is None, (task, metric)
            else:
                assert t[metric] == pytest.approx(o[metric], rel=1e-4), (task, metric)

    # request by request: the same prompt strings, the same numbers
    tok = ev.get_tokenizer()
    pairs = [p for task in ev.ALL_TASKS for d in ev.load_docs(task, bench, N_PER_TASK) for p in d.pairs]
    assert set(pairs) == set(seen)
    mine = ev.loglikelihood(model, tok, pairs, progress=False)
    for p, (ll, greedy) in zip(pairs, mine):
        assert seen[p][0] == pytest.approx(ll, abs=2e-4) and seen[p][1] == greedy


def test_cli_harness_lm_eval(tmp_path, bench, capsys):
    import json

    from memoryformer.cli import main as cli_main

    torch.manual_seed(0)
    ck = mf.save_model(vocab_model(), tmp_path / "ck")
    cli_main(["eval", "--checkpoint", str(ck), "--tasks", "wsc", "--data-dir", str(bench), "--limit", "2",
              "--harness", "lm-eval", "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON object only
    assert out["wsc"]["n"] == 2 and out["wsc"]["acc_norm"] is None
