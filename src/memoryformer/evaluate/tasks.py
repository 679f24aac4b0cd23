"""Zero-shot tasks: lm-evaluation-harness's standard prompts for the paper's six benchmarks and LAMBADA.

Field names follow lm-eval's own datasets, so its prompts apply unchanged:
- piqa, arc_easy, arc_challenge, logiqa: "acc" and "acc_norm" (log-likelihood divided by the choice's characters);
- winogrande (partial scoring: the shared continuation after each filled-in context) and SuperGLUE wsc: "acc";
- lambada_openai: "acc" (the last word is the greedy continuation) and "ppl" = exp(-mean log-likelihood of it).
Each task reads one JSON Lines file from a benchmark folder (`--data-dir`, or $MEMORYFORMER_EVAL_DIR); without one,
its records come from lm-eval's own Hugging Face dataset (`evaluate.sources`). File layout: docs/EVALUATION.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from memoryformer.config import MemoryFormerError

PAPER_TASKS = ("piqa", "winogrande", "wsc", "arc_easy", "arc_challenge", "logiqa")
ALL_TASKS = PAPER_TASKS + ("lambada_openai",)
ALIASES = {"lambada": "lambada_openai", "superglue_wsc": "wsc", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge"}


@dataclass
class Doc:
    """One example: a (context, continuation) string pair per choice, the gold index, and the choice strings whose
    character lengths normalise `acc_norm` (lm-eval's `doc_to_choice`)."""

    pairs: list[tuple[str, str]]
    gold: int
    choices: list[str]


# ---------------------------------------------------------------------------------------------------------------
# Prompts: the standard lm-eval task definitions, zero-shot, target delimiter " ".


def _detokenize(s: str) -> str:
    # lm-eval's general_detokenize, which its SuperGLUE WSC prompt applies to the passage
    s = s.replace(" n't", "n't").replace(" )", ")").replace("( ", "(").replace('" ', '"').replace(' "', '"')
    return re.sub(r" (['.,])", r"\1", s)


def _piqa(d):
    return Doc([(f"Question: {d['goal']}\nAnswer:", " " + s) for s in (d["sol1"], d["sol2"])], int(d["label"]),
               [d["sol1"], d["sol2"]])


def _arc(d):
    ctx = f"Question: {d['question']}\nAnswer:"
    texts = d["choices"]["text"]
    return Doc([(ctx, " " + t) for t in texts], d["choices"]["label"].index(d["answerKey"]), list(texts))


def _logiqa(d):
    prompt = f"Passage: {d['context']}\nQuestion: {d['question']}\nChoices:\n"
    prompt += "".join(f"{c}. {o}\n" for c, o in zip("ABCD", d["options"])) + "Answer:"
    return Doc([(prompt, " " + o) for o in d["options"]], "abcd".index(d["label"].strip()), list(d["options"]))


def _winogrande(d):
    # multiple-input mode: the choices are the contexts, the continuation is shared
    return Doc([(c, " " + d["continuation"]) for c in d["contexts"]], int(d["label"]), list(d["contexts"]))


def _wsc(d):
    # span indices are word indices into the whitespace-split passage
    text = d["text"]
    pre = " ".join(text.split()[: d["span2_index"]])
    post = text[len(pre) + len(d["span2_text"]) + 1 :]
    passage = _detokenize(pre + f" *{d['span2_text']}*" + post)
    ctx = (f"Passage: {passage}\n"
           f"Question: In the passage above, does the pronoun \"*{d['span2_text']}*\" refer to \"*{d['span1_text']}*\"?\n"
           "Answer:")
    return Doc([(ctx, " no"), (ctx, " yes")], int(d["label"]), ["no", "yes"])


def _lambada(d):
    words = d["text"].split(" ")
    return Doc([(" ".join(words[:-1]), " " + words[-1])], 0, [words[-1]])


@dataclass(frozen=True)
class TaskSpec:
    file: str  # the task's file in a benchmark folder
    build: Callable[[dict], Doc]
    metrics: tuple[str, ...]
    upstream: str  # lm-eval's task definition, relative to lm_eval/tasks
    split: str  # the split lm-eval scores (its test split where it has one, else validation)


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa_validation.jsonl", _piqa, ("acc", "acc_norm"), "piqa/piqa.yaml", "validation"),
    "winogrande": TaskSpec("winogrande_partial.jsonl", _winogrande, ("acc",), "winogrande/default.yaml", "validation"),
    "wsc": TaskSpec("superglue_wsc_val.jsonl", _wsc, ("acc",), "super_glue/wsc/default.yaml", "validation"),
    "arc_easy": TaskSpec("arc_easy_test.jsonl", _arc, ("acc", "acc_norm"), "arc/arc_easy.yaml", "test"),
    "arc_challenge": TaskSpec("arc_challenge_test.jsonl", _arc, ("acc", "acc_norm"), "arc/arc_challenge.yaml", "test"),
    "logiqa": TaskSpec("logiqa_test.jsonl", _logiqa, ("acc", "acc_norm"), "logiqa/logiqa.yaml", "test"),
    "lambada_openai": TaskSpec("lambada_openai_test.jsonl", _lambada, ("acc", "ppl"), "lambada/lambada_openai.yaml",
                               "test"),
}


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """Task names from "a,b,c" or a list; None -> the paper's six; "all" -> those + lambada_openai."""
    if tasks is None:
        return list(PAPER_TASKS)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    out: list[str] = []
    for name in names:
        if name == "all":
            out += [t for t in ALL_TASKS if t not in out]
            continue
        key = ALIASES.get(name.lower(), name.lower())
        if key not in TASKS:
            raise MemoryFormerError(f"tasks: unknown task {name!r} (valid: {', '.join(ALL_TASKS)}, lambada, all)")
        if key not in out:
            out.append(key)
    if not out:
        raise MemoryFormerError(f"tasks: no task given (valid: {', '.join(ALL_TASKS)}, lambada, all)")
    return out


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
