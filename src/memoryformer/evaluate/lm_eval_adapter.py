"""lm-evaluation-harness (`lm_eval` >= 0.4.2, extra `memoryformer[eval]`) adapter.

- `MemoryFormerLM`: an `lm_eval` `TemplateLM` registered as "memoryformer" when this module is imported.
  lm-eval does not discover models through entry points, so import this module first (or use `run_lm_eval`):

      import memoryformer.evaluate.lm_eval_adapter  # registers "memoryformer"
      lm_eval.simple_evaluate(model="memoryformer", model_args="checkpoint=runs/tiny/final", tasks=[...],
                              task_manager=TaskManager(include_path=write_task_yamls(dir)))

- `write_task_yamls(out_dir)`: task YAMLs for the local benchmark files. Each one `include`s lm-eval's own task
  definition (so prompts, choices and metrics are lm-eval's, whatever its version) and only swaps the dataset for a
  local JSON file given by absolute path; WinoGrande, stored pre-split for partial scoring, uses lm-eval's
  multiple-input mode on the `contexts` / `continuation` / `label` fields. Without a benchmark folder the files
  are first written from lm-eval's Hugging Face datasets (`evaluate.sources`); lm-eval then runs offline.
- `run_lm_eval(...)`: both together, returning the same `{task: {"acc", "acc_norm", "n"}}` shape as
  `memoryformer.evaluate.evaluate_tasks` (`memoryformer eval --harness lm-eval` calls it).

This LM scores every (context, continuation) pair with one plain forward pass of the whole model, as lm-eval's
Hugging Face model does; `memoryformer.evaluate` computes the same numbers with its faster shared-context path, and
the tests check that the two agree.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from memoryformer.config import MemoryFormerError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "memoryformer.evaluate.lm_eval_adapter needs lm-evaluation-harness: pip install 'memoryformer[eval]'"
    ) from e

from memoryformer.data import EOT_ID
from memoryformer.evaluate.scoring import get_tokenizer
from memoryformer.evaluate.tasks import TASKS, parse_tasks, resolve_data_dir, task_file
from memoryformer.integrity import write_text

# Where each of our tasks comes from inside lm_eval/tasks, and which split of the local file it evaluates.
_UPSTREAM = {task: (spec.upstream, spec.split) for task, spec in TASKS.items()}


@register_model("memoryformer")
class MemoryFormerLM(TemplateLM):
    """A MemoryFormer (or dense control) checkpoint as an lm-eval model.

    model_args: `checkpoint=DIR` (or pass `model=` a loaded model in Python), `device=cpu`, `batch_size=32`,
    `max_length` (defaults to the model's max_seq_len).
    """

    def __init__(self, checkpoint: str | None = None, model=None, device: str = "cpu", batch_size: int | str = 32,
                 max_length: int | None = None, tokenizer=None, **unused):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise MemoryFormerError("memoryformer lm-eval model: pass model_args checkpoint=DIR")
            from memoryformer.checkpoint import load_model

            model = load_model(checkpoint, device=device)
        self.model = model.to(device).eval()
        self._device = torch.device(device)
        self.tokenizer = tokenizer or get_tokenizer()
        # "auto" asks HF models to probe memory; a fixed size is right for CPU models
        self.batch_size = 32 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)

    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        # longest first, as lm-eval's own models, so the first batch shows the worst-case memory
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for j in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="lm-eval loglikelihood"):
            chunk = order[j : j + self.batch_size]
            rows = []
            for i in chunk:
                _, ctx, cont = requests[i]
                inp = (ctx + cont)[-(self.max_length + 1) :][:-1]
                rows.append((inp, cont))
            T = max(len(r) for r, _ in rows)
            idx = torch.zeros(len(rows), T, dtype=torch.long)
            for k, (r, _) in enumerate(rows):
                idx[k, : len(r)] = torch.tensor(r)
            logits, _ = self.model(idx.to(self._device))
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for k, (i, (r, cont)) in enumerate(zip(chunk, rows)):
                n = len(cont)
                lp = logp[k, len(r) - n : len(r)]  # (n, V)
                tgt = torch.tensor(cont, device=lp.device)
                out[i] = (lp.gather(1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all()))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in [r.args for r in requests]:
            windows = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, c, k) for c, k in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (no KV cache: these models are small) until a stop string or max_gen_toks."""
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context) or [self.eot_token_id]
            new: list[int] = []
            for _ in range(int(gen_kwargs.get("max_gen_toks", 256))):
                window = (ids + new)[-self.max_length :]
                logits, _ = self.model(torch.tensor([window], device=self._device))
                nxt = int(logits[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(s in text for s in until):
                    break
            text = self.tok_decode(new)
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def write_task_yamls(out_dir: str | os.PathLike, tasks=None, data_dir: str | os.PathLike | None = None) -> Path:
    """Write one YAML per task into `out_dir` (usable as lm-eval's include_path); returns `out_dir`.

    Without a benchmark folder the records come from lm-eval's Hugging Face datasets (`evaluate.sources`), written
    to `out_dir`/data in our layout, so both scorers read the same examples."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    upstream_root = _lm_eval_tasks_dir()
    if resolve_data_dir(data_dir) is None:
        from memoryformer.evaluate.sources import write_files

        write_files(out / "data", tasks)
        data_dir = out / "data"
    for task in parse_tasks(tasks):
        upstream, split = _UPSTREAM[task]
        base = upstream_root / upstream
        if not base.is_file():
            raise MemoryFormerError(f"{task}: lm-eval's task definition {base} not found (lm_eval >= 0.4.2 needed)")
        cfg = {
            "include": str(base),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(task_file(task, data_dir).resolve())}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "tag": [],
        }
        if task == "winogrande":
            cfg.update(doc_to_text="label", doc_to_choice="contexts", doc_to_target="continuation",
                       should_decontaminate=False)
        write_text(out / f"{task}.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return out


def run_lm_eval(model, tasks=None, *, data_dir=None, limit: int | None = None, batch_size: int = 32,
                device: str = "cpu", progress: bool = True) -> dict[str, dict]:
    """Run lm-eval offline on the local benchmark files; `model` is a loaded model or a checkpoint path.

    Returns {task: {"acc", "acc_norm" (None where the task has none), "n"[, "ppl"]}}.
    """
    import logging

    names = parse_tasks(tasks)
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    if isinstance(model, (str, os.PathLike)):
        lm = MemoryFormerLM(checkpoint=str(model), device=device, batch_size=batch_size)
    else:
        lm = MemoryFormerLM(model=model, device=device, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="memoryformer-lm-eval-") as tmp:
        write_task_yamls(tmp, names, data_dir)  # fetches from the Hub first when there is no benchmark folder
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval itself then reads only the local files
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import lm_eval
        from lm_eval.tasks import TaskManager

        # lm-eval prints progress and notices on stdout; keep stdout for our results (--json)
        with contextlib.redirect_stdout(sys.stderr):
            res = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=TaskManager(include_path=tmp, include_defaults=False),
                limit=limit, bootstrap_iters=0, log_samples=False, num_fewshot=0,
            )
    out = {}
    for task in names:
        r = res["results"][task]
        n = res.get("n-samples", {}).get(task, {}).get("effective")
        out[task] = {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"), "n": n}
        if "perplexity,none" in r:
            out[task]["ppl"] = r["perplexity,none"]
    return out
