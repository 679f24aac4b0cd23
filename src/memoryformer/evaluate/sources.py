"""Where the zero-shot benchmarks come from when no benchmark folder is given: lm-evaluation-harness's own task
definitions and their Hugging Face datasets, fetched and cached by `datasets`, converted to our record layout.

- `hub_source(task)`: the dataset path, config and split, read from lm-eval's task YAML in the installed `lm_eval`
  package (its `include:` followed); without `lm_eval`, the values of lm-eval 0.4.13 (`FALLBACK`).
- `hub_dataset(task)`: `datasets.load_dataset(path, config, split=...)`: downloaded once into the `datasets` cache
  ($HF_DATASETS_CACHE), read from there afterwards, offline too. A dataset the Hub still serves as a loading script,
  which `datasets` >= 4 no longer runs, is read from the Hub's parquet conversion of it instead.
- `to_record(task, row)`: one row in the layout of the task's file (docs/EVALUATION.md): lm-eval's own field names,
  except WinoGrande, whose sentence is split at its blank into the two filled-in contexts and the shared continuation
  (lm-eval's partial scoring).
- `write_files(out_dir)`: the seven files for a machine without network (`python -m memoryformer.evaluate.sources DIR`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from memoryformer.config import MemoryFormerError
from memoryformer.evaluate.prompts import ALL_TASKS, TASKS, parse_tasks
from memoryformer.integrity import write_text

PARQUET_REVISION = "refs/convert/parquet"  # the Hub's automatic parquet copy of every public dataset


@dataclass(frozen=True)
class HubSource:
    path: str  # Hugging Face dataset id
    name: str | None  # its config
    split: str

    @property
    def label(self) -> str:
        return f"{self.path}" + (f" ({self.name})" if self.name else "") + f" {self.split}"


# lm-eval 0.4.13's dataset_path / dataset_name of each task, used when lm_eval is not installed
FALLBACK = {
    "piqa": HubSource("baber/piqa", None, "validation"),
    "winogrande": HubSource("allenai/winogrande", "winogrande_xl", "validation"),
    "wsc": HubSource("aps/super_glue", "wsc.fixed", "validation"),
    "arc_easy": HubSource("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": HubSource("allenai/ai2_arc", "ARC-Challenge", "test"),
    "logiqa": HubSource("EleutherAI/logiqa", "logiqa", "test"),
    "lambada_openai": HubSource("EleutherAI/lambada_openai", "default", "test"),
}

# the fields each of our files keeps (lm-eval's names); WinoGrande is converted, see to_record
FIELDS = {
    "piqa": ("goal", "sol1", "sol2", "label"),
    "wsc": ("text", "span1_index", "span2_index", "span1_text", "span2_text", "label"),
    "arc_easy": ("question", "choices", "answerKey"),
    "arc_challenge": ("question", "choices", "answerKey"),
    "logiqa": ("label", "context", "question", "options"),
    "lambada_openai": ("text",),
}


def lm_eval_tasks_dir() -> Path | None:
    """lm_eval/tasks of the installed lm-evaluation-harness (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "tasks"
    return d if d.is_dir() else None


def read_task_yaml(path: Path) -> dict:
    """An lm-eval task YAML with its `include:` chain merged (the including file wins). Tags such as `!function`
    read as None: only the dataset fields are used here."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}
    base = cfg.pop("include", None)
    if base:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        cfg = {**read_task_yaml(base_path), **cfg}
    return cfg


def hub_source(task: str) -> HubSource:
    """The dataset lm-eval scores `task` on: from its installed task YAML if there is one, else `FALLBACK`."""
    root = lm_eval_tasks_dir()
    path = root / TASKS[task].upstream if root is not None else None
    if path is None or not path.is_file():
        return FALLBACK[task]
    cfg = read_task_yaml(path)
    if not cfg.get("dataset_path") or cfg["dataset_path"] in ("json", "csv", "parquet", "text"):
        return FALLBACK[task]
    split = cfg.get("test_split") or cfg.get("validation_split") or TASKS[task].split
    return HubSource(cfg["dataset_path"], cfg.get("dataset_name"), split)


def _offline_hint(task: str) -> str:
    return (f"offline, pass --data-dir DIR with {TASKS[task].file} and the other task files (docs/EVALUATION.md; "
            "`python -m memoryformer.evaluate.sources DIR` writes them on a machine with network)")


def hub_dataset(task: str):
    """The `datasets.Dataset` lm-eval scores `task` on (fetched into the datasets cache on first use)."""
    src = hub_source(task)
    try:
        import datasets
    except ImportError:
        raise MemoryFormerError(f"{task}: fetching {src.label} needs the `datasets` package (pip install "
                                f"'memoryformer[eval]'); {_offline_hint(task)}") from None
    datasets.logging.set_verbosity_error()  # no "using the cached version" notes between our lines
    try:
        try:
            return datasets.load_dataset(src.path, src.name, split=src.split)
        except RuntimeError as e:  # a loading-script dataset: read the Hub's parquet conversion of it
            if "scripts are no longer supported" not in str(e):
                raise
            return datasets.load_dataset(src.path, src.name, split=src.split, revision=PARQUET_REVISION)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (connection, cache, not found); say one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MemoryFormerError(f"{task}: cannot load {src.label} from the Hugging Face Hub or the datasets cache "
                                f"({type(e).__name__}: {first[:160]}); {_offline_hint(task)}") from None


def to_record(task: str, row: dict) -> dict:
    """One dataset row -> one line of the task's file (the layout `evaluate.tasks` reads)."""
    if task == "winogrande":  # lm-eval's partial scoring: each option fills the blank, the rest is scored
        cut = row["sentence"].index("_")
        return {"contexts": [row["sentence"][:cut] + row["option1"], row["sentence"][:cut] + row["option2"]],
                "continuation": row["sentence"][cut + 1 :].strip(), "label": {"1": 0, "2": 1}[str(row["answer"])]}
    return {k: row[k] for k in FIELDS[task]}


def hub_records(task: str, limit: int | None = None) -> list[dict]:
    """The first `limit` examples of `task` (all when None) in dataset order, in our record layout."""
    ds = hub_dataset(task)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    out = []
    for i, row in enumerate(ds):
        try:
            out.append(to_record(task, row))
        except (KeyError, ValueError, TypeError) as e:
            raise MemoryFormerError(f"{hub_source(task).label} row {i}: not a {task} example ({type(e).__name__}: "
                                    f"{e}); the dataset changed its fields?") from None
    return out


def write_files(out_dir: str | os.PathLike, tasks=None, limit: int | None = None) -> dict[str, Path]:
    """Write each task's file (TASKS[task].file) into `out_dir`; {task: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in parse_tasks(tasks):
        path = out / TASKS[task].file
        text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in hub_records(task, limit))
        write_text(path, text)
        paths[task] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m memoryformer.evaluate.sources",
                                description="Write the benchmark files for `memoryformer eval --data-dir DIR` "
                                            "(from lm-eval's Hugging Face datasets)")
    p.add_argument("out", metavar="DIR")
    p.add_argument("--tasks", default="all", help=f"comma-separated: {', '.join(ALL_TASKS)}, or all (default)")
    args = p.parse_args(argv)
    try:
        for task, path in write_files(args.out, args.tasks).items():
            n = sum(1 for _ in open(path, encoding="utf-8"))
            print(f"{task}: {hub_source(task).label} -> {path} ({n:,} examples)")
    except MemoryFormerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
