"""Evaluation: zero-shot benchmarks with lm-evaluation-harness's prompts and metrics, and perplexity.

- `prompts`: the task definitions (prompts, choices, metrics);
- `tasks`: their examples, from a benchmark folder or (`sources`) lm-eval's Hugging Face datasets;
- `scoring`: log-likelihoods of continuations (lm-eval's rule) and the metrics (`evaluate_tasks`);
- `perplexity`: the one perplexity, shared with training's validation and the benchmarks;
- `lm_eval_adapter`: the same models as an lm-eval `TemplateLM` (optional extra `eval`); it depends on these modules,
  never the other way.
"""

from memoryformer.evaluate.perplexity import perplexity, window_nll
from memoryformer.evaluate.scoring import (
    encode_pair,
    evaluate_tasks,
    format_results,
    get_tokenizer,
    loglikelihood,
    loglikelihood_groups,
)
from memoryformer.evaluate.tasks import ALL_TASKS, PAPER_TASKS, TASKS, Doc, load_docs, parse_tasks, task_file

__all__ = ["ALL_TASKS", "PAPER_TASKS", "TASKS", "Doc", "encode_pair", "evaluate_tasks", "format_results",
           "get_tokenizer", "load_docs", "loglikelihood", "loglikelihood_groups", "parse_tasks", "perplexity",
           "task_file", "window_nll"]
