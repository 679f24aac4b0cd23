"""Zero-shot tasks: lm-evaluation-harness's standard prompts for the paper's six benchmarks and LAMBADA.

Field names follow lm-eval's own datasets, so its prompts apply unchanged:
- piqa, arc_easy, arc_challenge, logiqa: "acc" and "acc_norm" (log-likelihood divided by the choice's characters);
- winogrande (partial scoring: the shared continuation after each filled-in context) and SuperGLUE wsc: "acc";
- lambada_openai: "acc" (the last word is the greedy continuation) and "ppl" = exp(-mean log-likelihood of it).
Each task reads one JSON Lines file from a benchmark folder (`--data-dir`, or $MEMORYFORMER_EVAL_DIR).
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
    file: str
    build: Callable[[dict], Doc]
    metrics: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa_validation.jsonl", _piqa, ("acc", "acc_norm")),
    "winogrande": TaskSpec("winogrande_partial.jsonl", _winogrande, ("acc",)),
    "wsc": TaskSpec("superglue_wsc_val.jsonl", _wsc, ("acc",)),
    "arc_easy": TaskSpec("arc_easy_test.jsonl", _arc, ("acc", "acc_norm")),
    "arc_challenge": TaskSpec("arc_challenge_test.jsonl", _arc, ("acc", "acc_norm")),
    "logiqa": TaskSpec("logiqa_test.jsonl", _logiqa, ("acc", "acc_norm")),
    "lambada_openai": TaskSpec("lambada_openai_test.jsonl", _lambada, ("acc", "ppl")),
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
    """$MEMORYFORMER_EVAL_DIR when set, else None."""
    env = os.environ.get("MEMORYFORMER_EVAL_DIR")
    return Path(env) if env else None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if path is None:
        raise MemoryFormerError(
            "data-dir: no benchmark folder given; pass --data-dir DIR (files named as in docs/EVALUATION.md, "
            f"e.g. {TASKS['piqa'].file}) or set MEMORYFORMER_EVAL_DIR"
        )
    if not path.is_dir():
        raise MemoryFormerError(f"data-dir: {path} is not a folder")
    return path


def task_file(task: str, data_dir: str | os.PathLike | None = None) -> Path:
    path = resolve_data_dir(data_dir) / TASKS[task].file
    if not path.is_file():
        raise MemoryFormerError(f"{task}: benchmark file {path} not found")
    return path


def load_docs(task: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Doc]:
    """The first `limit` examples of `task` (all when None), in file order."""
    path, spec = task_file(task, data_dir), TASKS[task]
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                docs.append(spec.build(json.loads(line)))
            except (json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as e:
                raise MemoryFormerError(f"{path}:{lineno}: not a {task} example ({type(e).__name__}: {e})") from None
    return docs
