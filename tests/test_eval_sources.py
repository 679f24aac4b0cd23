"""Benchmarks without a folder: lm-eval's Hugging Face datasets, read here from a locally built `datasets` cache with
the network off (HF_DATASETS_OFFLINE=1), converted to the layout of our files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import memoryformer as mf
from memoryformer import evaluate as ev
from memoryformer.evaluate import sources
from memoryformer.evaluate.tasks import TASKS

datasets = pytest.importorskip("datasets")

SRC = Path(__file__).resolve().parents[1] / "src"
DOC = Path(__file__).resolve().parents[1] / "docs" / "EVALUATION.md"

# WinoGrande as the Hub stores it: the blank and both options; the fixture file holds the same examples split
WINOGRANDE_ROWS = [
    {"sentence": "The trophy did not fit in the case because the _ was too big.", "option1": "trophy",
     "option2": "case", "answer": "1"},
    {"sentence": "Anna helped Maria because _ needed help.", "option1": "Anna", "option2": "Maria", "answer": "2"},
    {"sentence": "The cup broke the plate because the _ was hard.", "option1": "cup", "option2": "plate",
     "answer": "1"},
]


def _fixture_records(bench, task):
    return [json.loads(x) for x in (bench / TASKS[task].file).read_text(encoding="utf-8").splitlines() if x.strip()]


def _hub_rows(bench, task):
    """Rows in the Hub's layout: our fixtures are lm-eval's field names, except WinoGrande."""
    if task == "winogrande":
        return WINOGRANDE_ROWS
    rows = _fixture_records(bench, task)
    if task.startswith("arc"):
        rows = [{"id": f"q{i}", **r} for i, r in enumerate(rows)]  # fields we drop
    return rows


def build_datasets_cache(cache: Path, bench: Path, tasks=ev.ALL_TASKS) -> None:
    """A `datasets` cache holding each task's Hub dataset (path, config, split as `sources.hub_source` says), laid
    out as `load_dataset` leaves it after a download: <namespace>___<name>/<config>/<version>/<hash>/."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    for task in tasks:
        src = sources.hub_source(task)
        scratch = cache.parent / f"build-{task}"
        scratch.mkdir(parents=True)
        rows = scratch / "rows.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in _hub_rows(bench, task)), encoding="utf-8")
        name = src.path.split("/")[-1]
        builder = Json(cache_dir=str(scratch / "c"), dataset_name=name, config_name=src.name,
                       data_files={src.split: str(rows)}, hash="0123456789abcdef")
        builder.download_and_prepare()
        (built,) = (scratch / "c" / camelcase_to_snakecase(name)).iterdir()  # <config>-<data files hash>
        ns, _, base = src.path.rpartition("/")
        dest = cache / "___".join([x for x in (ns, camelcase_to_snakecase(base)) if x]) / (src.name or "default")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), dest)


def _offline_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MEMORYFORMER_EVAL_DIR"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]))
    return env


def _run(args, cache, cwd):
    return subprocess.run([sys.executable, *args], env=_offline_env(cache), cwd=cwd, capture_output=True, text=True,
                          timeout=300)


# -- where the datasets are ------------------------------------------------------------------------------------------


def test_hub_sources_follow_lm_eval_task_yamls(tmp_path, monkeypatch):
    # a tasks folder the way lm-eval lays it out: includes, !function tags, a test split that wins over validation
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "arc_easy.yaml").write_text(
        "task: arc_easy\ndataset_path: someone/arc\ndataset_name: Easy\nvalidation_split: validation\n"
        "test_split: test\ndoc_to_text: !function utils.doc_to_text\n", encoding="utf-8")
    (tmp_path / "arc" / "arc_challenge.yaml").write_text(
        "include: arc_easy.yaml\ntask: arc_challenge\ndataset_name: Challenge\n", encoding="utf-8")
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "piqa.yaml").write_text(
        "task: piqa\ndataset_path: other/piqa\ndataset_name: null\nvalidation_split: validation\ntest_split: null\n",
        encoding="utf-8")
    monkeypatch.setattr(sources, "lm_eval_tasks_dir", lambda: tmp_path)
    assert sources.hub_source("arc_challenge") == sources.HubSource("someone/arc", "Challenge", "test")
    assert sources.hub_source("piqa") == sources.HubSource("other/piqa", None, "validation")
    assert sources.hub_source("logiqa") == sources.FALLBACK["logiqa"]  # no YAML there: the built-in values
    monkeypatch.setattr(sources, "lm_eval_tasks_dir", lambda: None)  # lm_eval not installed
    assert sources.hub_source("arc_challenge") == sources.FALLBACK["arc_challenge"]


def test_installed_lm_eval_names_the_datasets():
    pytest.importorskip("lm_eval")
    assert sources.lm_eval_tasks_dir() is not None
    for task in ev.ALL_TASKS:
        src = sources.hub_source(task)
        assert src.split == TASKS[task].split and "/" in src.path  # a Hub id, and the split our file holds
    assert sources.hub_source("arc_challenge").name == "ARC-Challenge"  # through arc_challenge.yaml's include


def test_rows_convert_to_the_file_layout(bench):
    assert [sources.to_record("winogrande", r) for r in WINOGRANDE_ROWS] == _fixture_records(bench, "winogrande")
    for task in ("piqa", "wsc", "arc_easy", "logiqa", "lambada_openai"):
        for row, rec in zip(_hub_rows(bench, task), _fixture_records(bench, task)):
            assert sources.to_record(task, row) == {k: v for k, v in rec.items() if k in sources.FIELDS[task]}


# -- offline, from a datasets cache ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, bench):
    cache = tmp_path_factory.mktemp("hf") / "datasets"
    build_datasets_cache(cache, bench)
    return cache


def test_files_written_from_the_cache_equal_the_hand_made_ones(hub_cache, bench, tmp_path):
    r = _run(["-m", "memoryformer.evaluate.sources", str(tmp_path / "eval")], hub_cache, tmp_path)
    assert r.returncode == 0, r.stderr
    for task in ev.ALL_TASKS:
        got = [json.loads(x) for x in (tmp_path / "eval" / TASKS[task].file).read_text().splitlines()]
        want = [{k: v for k, v in rec.items() if task == "winogrande" or k in sources.FIELDS[task]}
                for rec in _fixture_records(bench, task)]
        assert got == want, task
        assert f"{task}: {sources.hub_source(task).label}" in r.stdout


def test_eval_without_data_dir_scores_the_cached_datasets(hub_cache, bench, tmp_path, vocab_model):
    model = vocab_model()
    ck = mf.save_model(model, tmp_path / "ck")
    r = _run(["-m", "memoryformer", "eval", "--checkpoint", str(ck), "--tasks", "all", "--limit", "2", "--json",
              "--no-progress"], hub_cache, tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want = ev.evaluate_tasks(model, "all", data_dir=bench, limit=2, progress=False)
    assert set(got) == set(ev.ALL_TASKS)
    for task in ev.ALL_TASKS:
        for k in ("acc", "acc_norm", "n", "ppl"):
            assert got[task].get(k) == pytest.approx(want[task].get(k)), (task, k)


def test_offline_with_nothing_cached_says_what_to_pass(tmp_path):
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    # the data fail before the checkpoint is read: it does not even exist here
    r = _run(["-m", "memoryformer", "eval", "--checkpoint", str(tmp_path / "nowhere"), "--tasks", "piqa"],
             empty, tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr
    assert f"cannot load {sources.hub_source('piqa').label}" in err[0]
    assert "offline, pass --data-dir DIR with piqa_validation.jsonl" in err[0] and "docs/EVALUATION.md" in err[0]


# -- the documented layout -------------------------------------------------------------------------------------------


def test_evaluation_doc_examples_are_valid_lines():
    """docs/EVALUATION.md gives each file's name and one example line; each line builds a Doc of its task."""
    text = DOC.read_text(encoding="utf-8")
    for task, spec in TASKS.items():
        assert f"`{spec.file}`" in text, spec.file
        head, _, rest = text.partition(f"### `{spec.file}`")
        assert rest, f"no section for {spec.file}"
        line = next(x for x in rest.splitlines() if x.startswith("{"))
        doc = spec.build(json.loads(line))
        assert doc.pairs and 0 <= doc.gold < len(doc.pairs)
