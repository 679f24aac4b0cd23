"""Training: the paper's recipe (spec §5) on real text, in one process or under `torchrun` (DDP, optional FSDP2).

    from memoryformer import get_config
    from memoryformer.train import TrainConfig, train
    summary = train(get_config("micro"), TrainConfig(out="runs/micro", max_tokens=2_000_000))

- `recipe`: peak LRs, the cosine schedule, the default run length, the optimizer;
- `run`: the state of a run, set up afresh or restored from a checkpoint (`resume_config`);
- `loop`: step, evaluate, log, checkpoint (`train`);
- `distributed`: devices, ranks, collectives, and DDP / FSDP2 applied from outside the model.
"""

from memoryformer.config import TrainConfig, load_run_config
from memoryformer.train.loop import train
from memoryformer.train.recipe import default_lr, default_tokens, dense_lr, lr_at, warmup_steps
from memoryformer.train.run import RESUME_FIXED, resume_config

__all__ = ["RESUME_FIXED", "TrainConfig", "default_lr", "default_tokens", "dense_lr", "load_run_config", "lr_at",
           "resume_config", "train", "warmup_steps"]
