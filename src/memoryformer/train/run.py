"""The state of one training run, and how it is set up afresh or restored from a checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from memoryformer import checkpoint as ckpt_io
from memoryformer import data as data_mod
from memoryformer.config import SAMPLE, ConfigError, MemoryFormerError, ModelConfig, TrainConfig
from memoryformer.footprint import footprint
from memoryformer.model import build_model
from memoryformer.optim import cast_tables
from memoryformer.resources import check_fits
from memoryformer.train import distributed as dist_mod
from memoryformer.train.distributed import Runtime, all_reduce, barrier
from memoryformer.train.recipe import build_optimizer, default_lr, default_tokens

# Changing these on resume would silently change the run (its data, batches or optimisation), so it is an error.
RESUME_FIXED = (
    "data", "val_data", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_frac", "weight_decay",
    "exclude_tables_from_wd", "beta1", "beta2", "eps", "grad_clip", "seed", "val_fraction", "fsdp",
    "table_optim", "table_dtype",
)
# Default micro-batch: as many sequences as fit this many tokens per forward (the fp32 logits and their gradient
# take ~16 bytes x vocab per token, 3.3 GB for 4096 tokens at vocab 50 304).
MICRO_BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}


@dataclass
class LogWindow:
    """Training numbers accumulated since the last metrics line (part of a checkpoint's trainer state)."""

    tokens: int = 0
    seconds: float = 0.0
    loss: float = 0.0
    steps: int = 0

    def reset(self) -> None:
        self.tokens, self.seconds, self.loss, self.steps = 0, 0.0, 0.0, 0


@dataclass
class Run:
    """Everything one invocation of `train` works with; the counters are what a checkpoint restores."""

    cfg: ModelConfig
    tcfg: TrainConfig
    rt: Runtime
    out: Path
    seq_len: int
    micro: int  # sequences per forward per rank
    accum: int  # micro-steps per optimizer step
    train_tok: np.ndarray
    val_tok: np.ndarray
    val_starts: np.ndarray
    sampler: data_mod.WindowSampler
    bare: torch.nn.Module  # the model itself
    model: torch.nn.Module  # as the step calls it (DDP / FSDP)
    opt: torch.optim.Optimizer
    peak_lr: float
    total: int = 0
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # wall time of all invocations
    train_time: float = 0.0  # time in optimizer steps
    data: dict = field(default_factory=dict)  # fingerprints of the train and val tokens (data.token_split)
    skipped: int = 0  # steps skipped for a non-finite loss or gradient norm, in all
    skip_streak: int = 0  # ... and in a row up to now
    last: dict = field(default_factory=dict)  # the latest metrics record
    window: LogWindow = field(default_factory=LogWindow)  # what the next metrics line averages
    val_loss: float | None = None  # of this invocation's latest evaluation
    tb: object = None

    @property
    def tokens_per_step(self) -> int:
        return self.tcfg.batch_size * self.seq_len


def resume_config(resume: str | os.PathLike, model_cfg: ModelConfig | None = None,
                  **overrides) -> tuple[ModelConfig, TrainConfig, Path]:
    """(model config, training config, checkpoint path) to continue the run at `resume` (a run folder or checkpoint).

    A run folder resumes from its newest checkpoint that verifies (`ckpt_io.find_resumable`). `overrides` may change
    how long and how the run continues (steps, tokens, time, logging, device, cache); changing anything in
    RESUME_FIXED, or passing a `model_cfg` that differs from the checkpoint's, is an error naming the key. Paths come
    from the checkpoint only as it wrote them (see `stored_paths`).
    """
    path = ckpt_io.find_resumable(resume, verify=overrides.get("verify", True))
    state_file = path / ckpt_io.TRAINER
    try:
        stored = json.loads(state_file.read_text(encoding="utf-8"))["train_config"]
        if not isinstance(stored, dict):
            raise TypeError(f"train_config is a {type(stored).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ckpt_io.CheckpointError(f"{state_file}: unreadable training state ({e})") from None
    saved_cfg = ModelConfig.load(path / ckpt_io.CONFIG)
    if model_cfg is not None:  # on the fields the model uses: a dense control ignores the memory fields
        for k, v in model_cfg.fields_that_apply().items():
            if saved_cfg.to_dict()[k] != v:
                raise ckpt_io.CheckpointError(
                    f"{k}: {v!r} contradicts the checkpoint's {saved_cfg.to_dict()[k]!r} ({path / ckpt_io.CONFIG})")
    for k, v in overrides.items():
        if k in RESUME_FIXED and k in stored and stored[k] != v:
            raise ckpt_io.CheckpointError(
                f"{k}: {v!r} contradicts the checkpoint's {stored[k]!r} ({state_file}); start a new run to change it")
    run_dir = path.parent if ckpt_io.is_checkpoint_name(path.name) else path
    # stop_after pauses one invocation, --no-verify trusts one; a resumed run goes on without them unless given again.
    merged = {**stored_paths(stored, state_file), "out": str(run_dir), "stop_after": None, "verify": True,
              **overrides}
    return saved_cfg, TrainConfig.from_dict(merged, source=str(state_file)), path


def stored_paths(stored: dict, source: Path) -> dict:
    """The stored training config with its paths confined: `cache_dir` is never taken from a checkpoint (the cache
    is keyed by content, so any folder serves; the user's --cache-dir or the default is used), and `data` /
    `val_data` only as this library writes them: "sample", "hf:...", or an absolute path without '..'."""
    out = {k: v for k, v in stored.items() if k not in ("cache_dir", "out")}
    for key in ("data", "val_data"):
        v = out.get(key)
        if v is None or v == SAMPLE or (isinstance(v, str) and v.startswith("hf:")):
            continue
        if not isinstance(v, str) or not os.path.isabs(v) or ".." in Path(v).parts:
            raise ckpt_io.CheckpointError(f"{source}: {key} {v!r} is not an absolute path without '..' as this "
                                          f"library writes it; pass --{key.replace('_', '-')} again or start a new run")
    return out


def _micro_batch(tcfg: TrainConfig, rt: Runtime, seq_len: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for this many ranks."""
    if tcfg.batch_size % rt.world:
        raise ConfigError(f"batch_size: {tcfg.batch_size} is not divisible by the {rt.world} ranks")
    per_rank = tcfg.batch_size // rt.world
    cap = max(1, MICRO_BATCH_TOKENS.get(rt.device.type, 2048) // seq_len)
    micro = tcfg.micro_batch_size or max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= cap)
    if per_rank % micro:
        raise ConfigError(f"micro_batch_size: {micro} does not divide the {per_rank} sequences per rank per step")
    return micro, per_rank // micro


def load_data(tcfg: TrainConfig, rt: Runtime, cfg: ModelConfig, seq_len: int):
    """(train tokens, val tokens, validation window starts, fingerprints {"train", "val"}); rank 0 tokenizes first,
    the others read its cache."""
    kw = dict(val_data=tcfg.val_data, cache_dir=tcfg.cache_dir, val_fraction=tcfg.val_fraction, verify=tcfg.verify)

    def load():
        progress = rt.is_main and tcfg.progress
        return (data_mod.token_split(tcfg.data, "train", progress=progress, **kw),
                data_mod.token_split(tcfg.data, "val", progress=progress, **kw))

    if rt.is_main:
        (train_tok, train_fp), (val_tok, val_fp) = load()
    barrier(rt)
    if not rt.is_main:
        (train_tok, train_fp), (val_tok, val_fp) = load()
    top = int(max(np.max(train_tok), np.max(val_tok)))
    if top >= cfg.vocab_size:
        raise ConfigError(f"vocab_size: the data holds token id {top} but the model's vocab_size is {cfg.vocab_size}")
    if len(val_tok) < seq_len + 1:
        raise data_mod.DataError(f"{tcfg.val_data or tcfg.data or 'sample'}: validation split has {len(val_tok)} "
                                 f"tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = data_mod.eval_starts(len(val_tok), seq_len, tcfg.eval_tokens)
    starts = starts[: max(rt.world, len(starts) // rt.world * rt.world)]  # equal work per rank
    return train_tok, val_tok, starts, {"train": train_fp, "val": val_fp}


def check_training_memory(cfg: ModelConfig, tcfg: TrainConfig, rt: Runtime, micro: int, accum: int,
                          seq_len: int) -> None:
    """One line, before anything is allocated, when this process's training memory (footprint's accounting: state,
    activations of one micro-batch, transients) will not fit in what the device has available."""
    dev = rt.device.type
    est = footprint(cfg, micro, seq_len, table_optim=tcfg.table_optim, table_dtype=tcfg.table_dtype, accum=accum,
                    sparse_rows=dev == "cpu" and tcfg.table_optim != "adamw", device=dev)
    what = (f"training {cfg.arch} {cfg.n_layer}x{cfg.d_model} ({est['state'] / 1e9:,.2f} GB of parameters, gradients "
            f"and optimizer state) at micro-batch {micro} x {seq_len} tokens")
    check_fits(est["total"], what, str(rt.device), force=tcfg.force_memory)


def setup(cfg: ModelConfig, tcfg: TrainConfig, rt: Runtime, seq_len: int, resume_path: Path | None) -> Run:
    if tcfg.tensorboard and rt.is_main:
        summary_writer()  # fails before anything is written
    micro, accum = _micro_batch(tcfg, rt, seq_len)
    check_training_memory(cfg, tcfg, rt, micro, accum, seq_len)
    train_tok, val_tok, val_starts, fingerprints = load_data(tcfg, rt, cfg, seq_len)
    if tcfg.deterministic:
        if rt.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Some CUDA kernels (the tables' scatter-add backward) have no deterministic version: warn, do not fail.
        torch.use_deterministic_algorithms(True, warn_only=rt.device.type == "cuda")
    torch.manual_seed(tcfg.seed)
    with torch.device("meta"):
        bare = build_model(cfg)
    bare.to_empty(device=rt.device)
    bare.init_weights()
    cast_tables(bare, tcfg.table_dtype)
    state = ckpt_io.load_training_checkpoint(resume_path, verify=tcfg.verify) if resume_path is not None else None
    if state is not None:
        bare.load_state_dict(state["model_state"])
    model = dist_mod.parallelize(bare, rt, tcfg.fsdp)
    run = Run(cfg, tcfg, rt, Path(tcfg.out), seq_len, micro, accum, train_tok, val_tok, val_starts,
              data_mod.WindowSampler(len(train_tok), seq_len + 1, tcfg.seed), bare, model,
              build_optimizer(bare, tcfg, rt.device), tcfg.lr or default_lr(cfg), data=fingerprints)
    run.total = None
    if state is not None:
        restore(run, state)
    if run.total is None:
        run.total = total_steps(run)
    return run


def restore(run: Run, state: dict) -> None:
    """Optimizer, counters, data position and RNG from a training checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(run.bare, run.opt, state["optimizer_state"],
                             options=StateDictOptions(full_state_dict=run.tcfg.fsdp))
    ts = state["trainer_state"]
    run.step, run.tokens, run.elapsed, run.train_time = ts["step"], ts["tokens"], ts["elapsed_s"], ts["train_time_s"]
    if run.tcfg.max_steps is None and run.tcfg.max_tokens is None:
        run.total = ts["total_steps"]
    run.sampler.load_state_dict(ts["sampler"])
    for split, fp in (ts.get("data") or {}).items():
        if run.tcfg.verify and run.data.get(split) not in (None, fp):
            raise data_mod.DataError(f"data: the {split} tokens of {run.tcfg.data or 'sample'} are not the ones "
                                     f"{state['path']} was trained on (fingerprint {run.data[split]} vs {fp}); "
                                     "resume with the same text, or start a new run")
    run.skipped, run.skip_streak = ts.get("skipped_steps", 0), ts.get("skip_streak", 0)
    run.last = ts.get("last") or {}
    run.window = LogWindow(**ts.get("window", {}))
    torch.set_rng_state(state["rng_state"]["torch_cpu"])
    if run.rt.device.type == "cuda" and "torch_cuda" in state["rng_state"]:
        torch.cuda.set_rng_state(state["rng_state"]["torch_cuda"], run.rt.device)


def total_steps(run: Run) -> int:
    t = run.tcfg
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        return max(1, math.ceil(t.max_tokens / run.tokens_per_step))
    if t.time_budget is not None:
        return max(1, int(0.95 * t.time_budget / calibrate(run)))
    return max(1, math.ceil(default_tokens(run.cfg) / run.tokens_per_step))


def batch(run: Run, starts: np.ndarray, a: int) -> torch.Tensor:
    """Micro-batch `a` of this rank from the global batch's window starts: (micro, seq_len + 1) tokens."""
    lo = (a * run.rt.world + run.rt.rank) * run.micro
    return data_mod.windows(run.train_tok, starts[lo : lo + run.micro], run.seq_len + 1).to(run.rt.device,
                                                                                          non_blocking=True)


def autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" else "float32"
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def calibrate(run: Run) -> float:
    """Seconds per optimizer step, timed on forward+backward only (the parameters do not change)."""
    gen = np.random.Generator(np.random.PCG64(run.tcfg.seed + 1))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        starts = gen.integers(0, len(run.train_tok) - run.seq_len, size=run.tcfg.batch_size)
        for a in range(run.accum):
            w = batch(run, starts, a)
            with autocast(run.rt.device, run.tcfg.precision):
                _, loss = run.bare(w[:, :-1], w[:, 1:])
            loss.backward()
        if run.rt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    run.opt.zero_grad(set_to_none=True)
    t = torch.tensor([min(times[1:]) * 1.1], device=run.rt.device)  # + optimizer step and logging
    return all_reduce(t, run.rt, "max").item()


def summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MemoryFormerError("tensorboard: the tensorboard package is not installed (pip install tensorboard)") from None
    return SummaryWriter
