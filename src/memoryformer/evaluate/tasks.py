"""Zero-shot examples from a benchmark folder or the Hugging Face Hub, as `Doc`s of the tasks in `evaluate.prompts`.

Each task reads one JSON Lines file from a benchmark folder (`--data-dir`, or $MEMORYFORMER_EVAL_DIR); without one,
its records come from lm-eval's own Hugging Face dataset (`evaluate.sources`). File layout: docs/EVALUATION.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from memoryformer.config import MemoryFormerError
from memoryformer.evaluate.prompts import ALIASES, ALL_TASKS, PAPER_TASKS, TASKS, Doc, TaskSpec, parse_tasks

__all__ = ["ALIASES", "ALL_TASKS", "PAPER_TASKS", "TASKS", "Doc", "TaskSpec", "check_sources", "default_data_dir",
           "load_docs", "load_records", "parse_tasks", "resolve_data_dir", "task_file"]


def default_data_dir() -> Path | None:
    """$MEMORYFORMER_EVAL_DIR when set, else None (the Hugging Face datasets)."""
    env = os.environ.get("MEMORYFORMER_EVAL_DIR")
    return Path(env) if env else None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The benchmark folder to read (`data_dir`, else $MEMORYFORMER_EVAL_DIR), or None: fetch from the Hub."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if path is not None and not path.is_dir():
        raise MemoryFormerError(f"data-dir: {path} is not a folder")
    return path


def task_file(task: str, data_dir: str | os.PathLike | None = None) -> Path:
    path = resolve_data_dir(data_dir)
    if path is None:
        raise MemoryFormerError(f"{task}: no benchmark folder given (pass --data-dir DIR or set MEMORYFORMER_EVAL_DIR)")
    path = path / TASKS[task].file
    if not path.is_file():
        raise MemoryFormerError(f"{task}: benchmark file {path} not found (file names and fields: docs/EVALUATION.md)")
    return path


def check_sources(tasks: Iterable[str], data_dir: str | os.PathLike | None = None) -> None:
    """Fail now, before a model loads, if a task's file is missing or its dataset cannot be fetched."""
    if resolve_data_dir(data_dir) is not None:
        for task in tasks:
            task_file(task, data_dir)
        return
    from memoryformer.evaluate import sources

    for task in tasks:
        sources.hub_dataset(task)  # downloads into the datasets cache once


def load_records(task: str, data_dir: str | os.PathLike | None = None,
                 limit: int | None = None) -> Iterable[tuple[str, dict]]:
    """(where, record) of the first `limit` examples of `task`: from its file in the benchmark folder, or from
    lm-eval's Hugging Face dataset when there is no folder; `where` names the line in error messages."""
    if resolve_data_dir(data_dir) is None:
        from memoryformer.evaluate import sources

        name = sources.hub_source(task).label
        for i, rec in enumerate(sources.hub_records(task, limit=limit)):
            yield f"{name} row {i}", rec
        return
    path, n = task_file(task, data_dir), 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and n >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MemoryFormerError(f"{path}:{lineno}: not a JSON line ({e})") from None
            n += 1
            yield f"{path}:{lineno}", rec


def load_docs(task: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Doc]:
    """The first `limit` examples of `task` (all when None), in file (or dataset) order."""
    spec, docs = TASKS[task], []
    for where, rec in load_records(task, data_dir, limit):
        try:
            docs.append(spec.build(rec))
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise MemoryFormerError(f"{where}: not a {task} example ({type(e).__name__}: {e}; fields: "
                                    "docs/EVALUATION.md)") from None
    return docs
