"""The zero-shot tasks' definitions: lm-evaluation-harness's standard prompts for the paper's six benchmarks and
LAMBADA, each task's file name, metrics and upstream split (`TASKS`), and the task-name parser.

Field names follow lm-eval's own datasets, so its prompts apply unchanged:
- piqa, arc_easy, arc_challenge, logiqa: "acc" and "acc_norm" (log-likelihood divided by the choice's characters);
- winogrande (partial scoring: the shared continuation after each filled-in context) and SuperGLUE wsc: "acc";
- lambada_openai: "acc" (the last word is the greedy continuation) and "ppl" = exp(-mean log-likelihood of it).
Reading the examples is `evaluate.tasks` (a benchmark folder) and `evaluate.sources` (the Hugging Face datasets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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
