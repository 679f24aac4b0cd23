"""`import memoryformer.lm_eval_adapter` registers the "memoryformer" model with lm-evaluation-harness (the import
path before 0.2; the adapter lives in `memoryformer.evaluate.lm_eval_adapter`)."""

from memoryformer.evaluate.lm_eval_adapter import MemoryFormerLM, run_lm_eval, write_task_yamls  # noqa: F401
