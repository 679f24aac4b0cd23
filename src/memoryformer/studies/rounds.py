"""Equal-token comparisons: several models trained in turns to the same token milestones, same data and batches.

Each contender is a run folder trained by `memoryformer.train.train`. At every milestone each contender in turn
trains (or resumes) up to that optimizer step and stops there with a checkpoint; the trainer evaluates at the stop,
so all contenders are compared on the same validation windows after the same tokens. A run already at or past a
milestone is not trained again: its numbers at that step are read back from its `metrics.jsonl`. So an interrupted
comparison is continued by calling it again, and a contender shared by several comparisons (the dense control) trains
once. Used by `memoryformer demo` and `benchmarks/quality.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memoryformer import checkpoint as ckpt_io
from memoryformer.config import MemoryFormerError, ModelConfig


@dataclass
class Contender:
    name: str  # label in reports
    cfg: ModelConfig
    run_dir: Path
    train: dict = field(default_factory=dict)  # TrainConfig overrides for this contender only (e.g. its LR)


class Interrupted(Exception):
    """Ctrl-C / SIGTERM during a round: the checkpoint is saved; calling again continues."""


def milestones(total_steps: int, rounds: int) -> list[int]:
    """`rounds` optimizer steps spread evenly over the schedule, the last one at its end."""
    return sorted({max(1, round(total_steps * (i + 1) / rounds)) for i in range(max(1, rounds))})


def steps_done(run_dir: Path) -> int:
    found = ckpt_io.find_checkpoint(run_dir, required=False)
    if found is None:
        return 0
    return int(json.loads((found / ckpt_io.TRAINER).read_text(encoding="utf-8"))["step"])


def summary_at(run_dir: Path, step: int) -> dict:
    """A run's summary with the validation and training loss it logged when it stopped at `step`."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("step") == step and "val_loss" in rec:
            return {**summary, "val_loss": rec["val_loss"], "train_loss": rec.get("loss"), "stopped_by": "done",
                    "steps": step, "tokens": rec.get("tokens", summary.get("tokens"))}
    raise MemoryFormerError(f"{run_dir}: no validation logged at step {step} (trained with another schedule?)")


def advance(c: Contender, base, step: int) -> dict:
    """Train contender `c` (TrainConfig `base` + `c.train`) up to optimizer step `step`; its summary there."""
    from memoryformer.train import resume_config, train

    done = steps_done(c.run_dir)
    if done >= step:
        return summary_at(c.run_dir, step)
    if done:
        _, tcfg, _ = resume_config(c.run_dir, c.cfg)
        s = train(None, tcfg.replace(stop_after=step, progress=base.progress, verbose=base.verbose), resume=c.run_dir)
    else:
        s = train(c.cfg, base.replace(out=str(c.run_dir), stop_after=step, **c.train))
    if s["stopped_by"] == "interrupt":
        raise Interrupted(str(c.run_dir))
    return s


def run_rounds(contenders: list[Contender], base, marks: list[int],
               on_round: Callable[[int, dict[str, dict]], None] | None = None,
               log: Callable[[str], None] = lambda m: None) -> dict[int, dict[str, dict]]:
    """Advance every contender to each milestone in turn; {milestone: {name: summary}}. `on_round` is called after
    each milestone (to rewrite a report), so an interrupted comparison still leaves its finished rounds."""
    out: dict[int, dict[str, dict]] = {}
    for ms in marks:
        row = {}
        for c in contenders:
            log(f"[{c.name}: to step {ms} of {marks[-1]}]")
            row[c.name] = advance(c, base, ms)
        out[ms] = row
        if on_round is not None:
            on_round(ms, row)
    return out
