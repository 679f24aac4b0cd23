"""Training: the paper's recipe (spec §5) on real text, single process or `torchrun` (DDP, optional FSDP2).

- AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices and (by default, as the authors do) the memory
  tables, none on biases and norms; gradient clipping at 1.0. Lighter table options (row-wise rules, bf16
  tables): `table_optim`, `table_dtype` (memoryformer.optim).
- Cosine decay to 0.1x the peak after a linear warmup over the first 1 % of steps.
- Peak LR by size: the Pythia LRs for the dense control (1e-3 up to d=512, 6e-4 at d=768, 3e-4 from d=1024) and
  3x that for MemoryFormer (paper §3.1: 3e-3 for MF-tiny).
- bf16 autocast with fp32 master weights on CUDA; fp32 on CPU.
- The global batch (`batch_size` sequences) is drawn by one seeded sampler and split over ranks and
  gradient-accumulation micro-steps, so any world size sees the same tokens in the same step.
- `OUT/metrics.jsonl`: one JSON object per logged step; `OUT/ckpt-<step>/`, `OUT/final/`: atomic, self-contained
  checkpoints; `--resume OUT` continues bit for bit (CPU, `deterministic=True`).

    from memoryformer import get_config
    from memoryformer.train import TrainConfig, train
    summary = train(get_config("micro"), TrainConfig(out="runs/micro", max_tokens=2_000_000))
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from memoryformer import checkpoint as ckpt_io
from memoryformer import data as data_mod
from memoryformer.config import (
    ConfigError,
    MemoryFormerError,
    ModelConfig,
    dataclass_from_dict,
    get_config,
    preset_names,
)
from memoryformer.flops import layer_flops
from memoryformer.model import build_model
from memoryformer.optim import TABLE_DTYPES, TABLE_OPTIMS, build_optimizer, cast_tables

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
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
class TrainConfig:
    """The training knobs. Every field is validated on construction; errors name the field."""

    data: str | None = None  # None or "sample": the bundled Gutenberg sample; else a file, folder, glob or hf:NAME
    val_data: str | None = None  # validation source; None: the data's val files, or its held-out tail
    out: str = "runs/train"  # run folder: metrics.jsonl, ckpt-<step>/, final/
    batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int | None = None  # sequences per forward per rank; None: fit MICRO_BATCH_TOKENS
    seq_len: int | None = None  # tokens per training sequence; None: the model's max_seq_len
    lr: float | None = None  # peak LR; None: `default_lr(model_config)`
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak
    warmup_frac: float = 0.01  # linear warmup, as a fraction of all steps
    weight_decay: float = 0.1
    exclude_tables_from_wd: bool = False  # True: no weight decay on the memory tables
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    table_optim: str = "adamw"  # memory tables: "adamw" (the recipe), "rowwise", "partial-rowwise-adam" (optim.py)
    table_dtype: str = "fp32"  # memory-table storage: "fp32" or "bf16" (updates stochastically rounded)
    max_steps: int | None = None  # the run's length in optimizer steps (sets the LR schedule) ...
    max_tokens: int | None = None  # ... or in training tokens ...
    time_budget: float | None = None  # ... or in seconds (also a hard stop for the other two); this run only
    stop_after: int | None = None  # end this invocation after this step (checkpoint saved; resume continues)
    eval_every: int = 200  # steps between validations (and at the end); 0: only at the end
    eval_tokens: int = 65536  # validation tokens per evaluation (fixed windows spread over the val text)
    log_every: int = 10  # steps between metrics.jsonl lines
    ckpt_every: int = 1000  # steps between ckpt-<step>/ checkpoints; 0: only final/
    keep_checkpoints: int | None = None  # keep only the newest N ckpt-<step>/; None: keep all
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms: bit-identical reruns and resumes on CPU (best effort on CUDA)
    device: str = "auto"  # "auto" (CUDA if present), "cpu" or "cuda"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    fsdp: bool = False  # FSDP2 (fully_shard per block, memory layers in their own unit) instead of DDP
    tensorboard: bool = False  # also log to OUT/tensorboard (needs the tensorboard package)
    progress: bool = True  # tqdm progress bar on rank 0
    verbose: bool = True  # print the run header and evaluations on rank 0
    cache_dir: str | None = None  # token cache; None: $MEMORYFORMER_CACHE or ~/.cache/memoryformer
    val_fraction: float = 0.01  # held-out tail when the data has no validation files

    def __post_init__(self):
        def fail(name, msg):
            raise ConfigError(f"{name}: {msg} (got {getattr(self, name)!r})")

        def want_int(name, lo, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, str):  # YAML 1.1 reads 5e6 as a string
                with contextlib.suppress(ValueError):
                    v = float(v)
            if isinstance(v, float) and v.is_integer():  # 5e6 or 5.0e+6
                v = int(v)
                setattr(self, name, v)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                fail(name, f"expected an integer >= {lo}" + (" or null" if optional else ""))

        def want_float(name, lo, hi=None, optional=False, open_lo=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, str):  # YAML reads 3e-3 as a string
                try:
                    v = float(v)
                except ValueError:
                    fail(name, "expected a number")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(name, "expected a number")
            setattr(self, name, float(v))
            if (v <= lo if open_lo else v < lo) or (hi is not None and v > hi):
                fail(name, f"expected a number in {'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}]")

        def want_bool(name):
            if not isinstance(getattr(self, name), bool):
                fail(name, "expected true or false")

        def want_str(name, optional=False, choices=None):
            v = getattr(self, name)
            if v is None and optional:
                return
            if not isinstance(v, str) or not v:
                fail(name, "expected a non-empty string")
            if choices and v not in choices:
                fail(name, f"expected one of {choices}")

        want_str("data", optional=True)
        want_str("val_data", optional=True)
        for name in ("data", "val_data", "cache_dir"):
            v = getattr(self, name)
            if isinstance(v, str) and v != data_mod.SAMPLE and not v.startswith("hf:"):
                setattr(self, name, os.path.abspath(os.path.expanduser(v)))  # resumable from any working dir
        want_str("out")
        want_int("batch_size", 1)
        want_int("micro_batch_size", 1, optional=True)
        want_int("seq_len", 1, optional=True)
        want_float("lr", 0.0, optional=True, open_lo=True)
        want_float("min_lr_ratio", 0.0, 1.0)
        want_float("warmup_frac", 0.0, 1.0)
        want_float("weight_decay", 0.0)
        want_bool("exclude_tables_from_wd")
        want_float("beta1", 0.0, 1.0)
        want_float("beta2", 0.0, 1.0)
        want_float("eps", 0.0)
        want_float("grad_clip", 0.0)
        want_str("table_optim", choices=TABLE_OPTIMS)
        want_str("table_dtype", choices=TABLE_DTYPES)
        want_int("max_steps", 1, optional=True)
        want_int("max_tokens", 1, optional=True)
        want_float("time_budget", 0.0, optional=True, open_lo=True)
        want_int("stop_after", 1, optional=True)
        want_int("eval_every", 0)
        want_int("eval_tokens", 1)
        want_int("log_every", 1)
        want_int("ckpt_every", 0)
        want_int("keep_checkpoints", 1, optional=True)
        want_int("seed", 0)
        for name in ("deterministic", "fsdp", "tensorboard", "progress", "verbose"):
            want_bool(name)
        want_str("device", choices=DEVICES)
        want_str("precision", choices=PRECISIONS)
        want_str("cache_dir", optional=True)
        want_float("val_fraction", 0.0, 0.5, open_lo=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "train config") -> "TrainConfig":
        return dataclass_from_dict(cls, d, source=source, what="training")

    def replace(self, **overrides) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **overrides}, source="override")


# ---------------------------------------------------------------------------------------------------------------
# Recipe pieces


def dense_lr(cfg: ModelConfig) -> float:
    """Pythia's LR for a model of this width: 1e-3 (70M and smaller), 6e-4 (160M), 3e-4 (410M and larger)."""
    return 1e-3 if cfg.d_model <= 512 else 6e-4 if cfg.d_model <= 768 else 3e-4


def default_lr(cfg: ModelConfig) -> float:
    """Peak LR: the dense control's, times 3 for MemoryFormer (paper §3.1)."""
    return dense_lr(cfg) * (3.0 if cfg.arch == "memoryformer" else 1.0)


def warmup_steps(total: int, warmup_frac: float) -> int:
    return max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.01, min_ratio: float = 0.1) -> float:
    """LR of 0-based optimizer step `step` of `total`: linear warmup, then cosine from `peak` to `min_ratio*peak`."""
    warm = warmup_steps(total, warmup_frac)
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------
# Config files (the CLI's --config)


def _coerce_model_fields(d: dict) -> dict:
    """YAML 1.1 reads `1e4` as a string: turn such strings into numbers for the float fields of ModelConfig."""
    floats = {f.name for f in fields(ModelConfig) if f.type in ("float", float)}
    out = dict(d)
    for k in floats & set(out):
        if isinstance(out[k], str):
            with contextlib.suppress(ValueError):
                out[k] = float(out[k])
    return out


def load_run_config(spec: str, model_overrides: dict | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, training-field overrides) from a preset name or a YAML/JSON file.

    A file holds `preset: <name>` (optional), model fields (overriding the preset) and an optional `train:` mapping
    of TrainConfig fields. `model_overrides` (e.g. from the command line) win over the file.
    """
    model_overrides = model_overrides or {}
    if spec in preset_names():
        return get_config(spec, **_coerce_model_fields(model_overrides)), {}
    path = Path(spec)
    if not path.is_file():
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            raise ConfigError(f"{spec}: config file not found")
        raise ConfigError(f"config: {spec!r} is neither a preset ({', '.join(preset_names())}) nor a YAML/JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{spec}: not UTF-8 text") from None
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: report the parser's position
        raise ConfigError(f"{spec}: cannot parse ({' '.join(str(e).split())})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{spec}: expected a mapping at the top level, got {type(doc).__name__}")
    doc = dict(doc)
    preset = doc.pop("preset", None)
    train_over = doc.pop("train", None) or {}
    if not isinstance(train_over, dict):
        raise ConfigError(f"{spec}: key 'train': expected a mapping of training fields")
    TrainConfig.from_dict({**TrainConfig(out="x").to_dict(), **train_over}, source=f"{spec} (train)")
    model_fields = _coerce_model_fields({**doc, **model_overrides})
    if preset is not None:
        if preset not in preset_names():
            raise ConfigError(f"{spec}: key 'preset': unknown preset {preset!r} (valid: {', '.join(preset_names())})")
        base = get_config(preset).to_dict()
    else:
        base = ModelConfig().to_dict()
    try:
        cfg = ModelConfig.from_dict({**base, **model_fields}, source=spec)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(spec) else f"{spec}: {msg}") from None
    return cfg, train_over


# ---------------------------------------------------------------------------------------------------------------
# Runtime: devices, distributed, autocast


@dataclass
class _Runtime:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group (so we tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' requested but no CUDA GPU is available (use --device cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _setup_runtime(tcfg: TrainConfig) -> _Runtime:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(tcfg.device, local_rank)
    if world > 1 or dist.is_initialized():
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
            owns = True
        return _Runtime(dist.get_rank(), dist.get_world_size(), device, owns)
    if tcfg.fsdp:
        raise ConfigError("fsdp: FSDP needs several processes; launch with torchrun --nproc_per_node=N")
    return _Runtime(0, 1, device, False)


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_reduce(x: torch.Tensor, rt: _Runtime, op: str = "sum") -> torch.Tensor:
    if rt.world == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x


def _barrier(rt: _Runtime) -> None:
    if rt.world > 1:
        import torch.distributed as dist

        dist.barrier()


def apply_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each Memory Layer (its tables and bias) is one unit, each block another, the rest the root."""
    from torch.distributed.fsdp import fully_shard

    from memoryformer.layers import MemoryLayer

    for block in model.blocks:
        for m in block.modules():
            if isinstance(m, MemoryLayer):
                fully_shard(m)
        fully_shard(block)
    fully_shard(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    starts: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    rt: _Runtime | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) over the windows `tokens[s : s + seq_len + 1]`, split over ranks."""
    rt = rt or _Runtime(0, 1, device, False)
    mine = starts[rt.rank :: rt.world]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    for i in range(0, len(mine), batch_size):
        w = data_mod.windows(tokens, mine[i : i + batch_size], seq_len + 1).to(device)
        with _autocast(device, precision):
            _, loss = model(w[:, :-1], w[:, 1:])
        n = w[:, 1:].numel()
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    model.train(was_training)
    total = _all_reduce(total, rt)
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------------------------------------------------------
# Resume


def resume_config(resume: str | os.PathLike, model_cfg: ModelConfig | None = None, **overrides) -> tuple[ModelConfig, TrainConfig, Path]:
    """(model config, training config, checkpoint path) to continue the run at `resume` (a run folder or checkpoint).

    `overrides` may change how long and how the run continues (steps, tokens, time, logging, device); changing
    anything in RESUME_FIXED, or passing a `model_cfg` that differs from the checkpoint's, is an error naming the key.
    """
    path = ckpt_io.find_checkpoint(resume)
    state_file = path / ckpt_io.TRAINER
    try:
        trainer = json.loads(state_file.read_text(encoding="utf-8"))
        stored = trainer["train_config"]
    except (OSError, ValueError, KeyError) as e:
        raise ckpt_io.CheckpointError(f"{state_file}: unreadable training state ({e})") from None
    saved_cfg = ModelConfig.load(path / ckpt_io.CONFIG)
    if model_cfg is not None:
        for k, v in model_cfg.to_dict().items():
            if saved_cfg.to_dict()[k] != v:
                raise ckpt_io.CheckpointError(
                    f"{k}: {v!r} contradicts the checkpoint's {saved_cfg.to_dict()[k]!r} ({path / ckpt_io.CONFIG})"
                )
    for k, v in overrides.items():
        if k in RESUME_FIXED and k in stored and stored[k] != v:
            raise ckpt_io.CheckpointError(
                f"{k}: {v!r} contradicts the checkpoint's {stored[k]!r} ({state_file}); start a new run to change it"
            )
    run_dir = path.parent if path.name == "final" or ckpt_io._CKPT_RE.match(path.name) else path
    # stop_after pauses one invocation; a resumed run goes on unless it is given again.
    merged = {**stored, "out": str(run_dir), "stop_after": None, **overrides}
    return saved_cfg, TrainConfig.from_dict(merged, source=str(state_file)), path


# ---------------------------------------------------------------------------------------------------------------
# The trainer


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop; the second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nmemoryformer: stopping after this step and saving a checkpoint (press Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _rank_checksums(model: torch.nn.Module, rt: _Runtime, sharded: bool) -> list[float]:
    """Sum of |p| over all parameters, per rank (float64): replicas that drifted apart show different values."""
    with torch.no_grad():
        local = sum(
            (p.to_local() if hasattr(p, "to_local") else p).detach().double().abs().sum().item()
            for p in model.parameters()
        )
    if rt.world == 1:
        return [local]
    import torch.distributed as dist

    t = torch.zeros(rt.world, dtype=torch.float64, device=rt.device)
    t[rt.rank] = local
    dist.all_reduce(t)
    if sharded:  # each rank holds a different shard: the total is the meaningful number
        return [t.sum().item()]
    return t.tolist()


def _default_micro(per_rank: int, seq_len: int, device: torch.device) -> int:
    cap = max(1, MICRO_BATCH_TOKENS.get(device.type, 2048) // seq_len)
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= cap)


def default_tokens(cfg: ModelConfig) -> int:
    """The run length when none is given: 20 tokens per parameter of the dense control of this shape (about
    compute-optimal for it), the same for a MemoryFormer and its control so that their default runs compare."""
    dense = cfg.replace(arch="transformer")
    n = sum(c.dense_params for c in layer_flops(dense, 1)) * cfg.n_layer
    return 20 * (n + 2 * cfg.vocab_size * cfg.d_model)


def _total_steps(tcfg: TrainConfig, tokens_per_step: int, calibrate, model_cfg: ModelConfig) -> int:
    if tcfg.max_steps is not None:
        return tcfg.max_steps
    if tcfg.max_tokens is not None:
        return max(1, math.ceil(tcfg.max_tokens / tokens_per_step))
    if tcfg.time_budget is not None:
        return max(1, int(0.95 * tcfg.time_budget / calibrate()))
    return max(1, math.ceil(default_tokens(model_cfg) / tokens_per_step))


def train(model_cfg: ModelConfig | None, tcfg: TrainConfig, *, resume: str | os.PathLike | None = None) -> dict:
    """Train `model_cfg` as `tcfg` says (or continue the run at `resume`) and return a summary.

    Returns {"out", "checkpoint", "steps", "total_steps", "tokens", "elapsed_s", "tokens_per_s", "train_loss",
    "val_loss", "val_ppl", "params", "stopped_by"}, where "stopped_by" is "done", "time_budget", "stop_after" or
    "interrupt".
    Under torchrun every rank calls this; all return the same summary.
    """
    resume_path = None
    if resume is not None:
        fixed = {k: getattr(tcfg, k) for k in RESUME_FIXED}
        model_cfg, _, resume_path = resume_config(resume, model_cfg, **fixed)
    if model_cfg is None:
        raise ConfigError("model_cfg: a ModelConfig is needed unless resuming")
    seq_len = tcfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len: {seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")

    rt = _setup_runtime(tcfg)
    prev_det = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(model_cfg, tcfg, rt, seq_len, resume_path)
    finally:
        torch.use_deterministic_algorithms(prev_det)
        if rt.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(model_cfg: ModelConfig, tcfg: TrainConfig, rt: _Runtime, seq_len: int, resume_path: Path | None) -> dict:
    out = Path(tcfg.out)
    say = print if (rt.is_main and tcfg.verbose) else (lambda *a, **k: None)
    SummaryWriter = None
    if tcfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MemoryFormerError("tensorboard: the tensorboard package is not installed (pip install tensorboard)") from None

    # -- geometry ----------------------------------------------------------------------------------------------
    if tcfg.batch_size % rt.world:
        raise ConfigError(f"batch_size: {tcfg.batch_size} is not divisible by the {rt.world} ranks")
    per_rank = tcfg.batch_size // rt.world
    micro = tcfg.micro_batch_size or _default_micro(per_rank, seq_len, rt.device)
    if per_rank % micro:
        raise ConfigError(f"micro_batch_size: {micro} does not divide the {per_rank} sequences per rank per step")
    accum = per_rank // micro
    tokens_per_step = tcfg.batch_size * seq_len

    # -- data (rank 0 tokenizes first; the others then read its cache) --------------------------------------------
    def load():
        kw = dict(val_data=tcfg.val_data, cache_dir=tcfg.cache_dir, val_fraction=tcfg.val_fraction)
        tr = data_mod.load_tokens(tcfg.data, "train", progress=rt.is_main and tcfg.progress, **kw)
        va = data_mod.load_tokens(tcfg.data, "val", progress=rt.is_main and tcfg.progress, **kw)
        return tr, va

    if rt.is_main:
        train_tok, val_tok = load()
    _barrier(rt)
    if not rt.is_main:
        train_tok, val_tok = load()
    top = int(max(np.max(train_tok), np.max(val_tok)))
    if top >= model_cfg.vocab_size:
        raise ConfigError(f"vocab_size: the data holds token id {top} but the model's vocab_size is {model_cfg.vocab_size}")
    if len(val_tok) < seq_len + 1:
        raise data_mod.DataError(
            f"{tcfg.val_data or tcfg.data or 'sample'}: validation split has {len(val_tok)} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}"
        )
    sampler = data_mod.WindowSampler(len(train_tok), seq_len + 1, tcfg.seed)
    starts_val = data_mod.eval_starts(len(val_tok), seq_len, tcfg.eval_tokens)
    starts_val = starts_val[: max(rt.world, len(starts_val) // rt.world * rt.world)]  # equal work per rank

    # -- model and optimizer --------------------------------------------------------------------------------------
    if tcfg.deterministic:
        if rt.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Some CUDA kernels (the tables' scatter-add backward) have no deterministic version: warn, do not fail.
        torch.use_deterministic_algorithms(True, warn_only=rt.device.type == "cuda")
    torch.manual_seed(tcfg.seed)
    with torch.device("meta"):
        bare = build_model(model_cfg)
    bare.to_empty(device=rt.device)
    bare.init_weights()
    cast_tables(bare, tcfg.table_dtype)
    if resume_path is not None:
        state = ckpt_io.load_training_checkpoint(resume_path)
        bare.load_state_dict(state["model_state"])
    model = bare
    if rt.world > 1:
        if tcfg.fsdp:
            model = apply_fsdp(bare)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(bare, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    peak = tcfg.lr or default_lr(model_cfg)
    # fused on CUDA; foreach elsewhere (torch picks the per-tensor loop on CPU, which is several times slower)
    fused = rt.device.type == "cuda" and not tcfg.fsdp
    opt = build_optimizer(bare, tcfg, lr=peak, fused=fused)  # AdamW + the table rule; iterable for DCP

    step, tokens, elapsed, train_time = 0, 0, 0.0, 0.0
    total = None
    last: dict = {}
    if resume_path is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(bare, opt, state["optimizer_state"],
                                 options=StateDictOptions(full_state_dict=tcfg.fsdp))
        ts = state["trainer_state"]
        step, tokens, elapsed, train_time = ts["step"], ts["tokens"], ts["elapsed_s"], ts["train_time_s"]
        total = ts["total_steps"] if tcfg.max_steps is None and tcfg.max_tokens is None else None
        sampler.load_state_dict(ts["sampler"])
        last = ts.get("last") or {}
        torch.set_rng_state(state["rng_state"]["torch_cpu"])
        if rt.device.type == "cuda" and "torch_cuda" in state["rng_state"]:
            torch.cuda.set_rng_state(state["rng_state"]["torch_cuda"], rt.device)
        del state

    def batch_for(starts: np.ndarray, a: int) -> torch.Tensor:
        lo = (a * rt.world + rt.rank) * micro
        return data_mod.windows(train_tok, starts[lo : lo + micro], seq_len + 1).to(rt.device, non_blocking=True)

    def calibrate() -> float:
        """Seconds per optimizer step, timed on forward+backward only (the parameters do not change)."""
        gen = np.random.Generator(np.random.PCG64(tcfg.seed + 1))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            starts = gen.integers(0, len(train_tok) - seq_len, size=tcfg.batch_size)
            for a in range(accum):
                w = batch_for(starts, a)
                with _autocast(rt.device, tcfg.precision):
                    _, loss = bare(w[:, :-1], w[:, 1:])
                loss.backward()
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
        t = torch.tensor([min(times[1:]) * 1.1], device=rt.device)  # + optimizer step and logging
        return _all_reduce(t, rt, "max").item()

    if total is None:
        total = _total_steps(tcfg, tokens_per_step, calibrate, model_cfg)
    if step >= total:
        say(f"{resume_path}: the run is already complete ({step} of {total} steps); "
            f"pass a larger --max-steps or --max-tokens to continue it")
        vl = last.get("val_loss")
        return dict(out=str(out), checkpoint=str(resume_path), steps=step, total_steps=total, tokens=tokens,
                    elapsed_s=round(elapsed, 2), tokens_per_s=round(tokens / max(train_time, 1e-9), 1),
                    train_loss=last.get("loss"), val_loss=vl, val_ppl=math.exp(min(vl, 50.0)) if vl is not None else None,
                    params=bare.num_params(), stopped_by="done", arch=model_cfg.arch)

    # -- output folder, metrics -------------------------------------------------------------------------------------
    metrics_path = out / "metrics.jsonl"
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_path is None and metrics_path.exists():
            if ckpt_io.list_checkpoints(out):
                raise ckpt_io.CheckpointError(
                    f"{out}: already holds a training run; use --resume {out} to continue it or pick a new --out"
                )
            metrics_path.unlink()
        if resume_path is not None and metrics_path.exists():
            keep = [ln for ln in metrics_path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
            ckpt_io._replace_file(metrics_path, lambda p: Path(p).write_text("".join(k + "\n" for k in keep)))
        (out / "train_config.json").write_text(json.dumps(tcfg.to_dict(), indent=1) + "\n")
        model_cfg.save(out / "config.json")
    tb = SummaryWriter(str(out / "tensorboard")) if (rt.is_main and SummaryWriter is not None) else None

    nparams = bare.num_params()
    say(
        f"memoryformer train: {model_cfg.arch} {model_cfg.n_layer}x{model_cfg.d_model} "
        f"({nparams['dense'] / 1e6:.2f} M dense + {nparams['table'] / 1e6:.2f} M table parameters) on "
        f"{rt.device}{f' x {rt.world} ranks' if rt.world > 1 else ''}\n"
        f"  data {tcfg.data or 'sample'}: {len(train_tok):,} train / {len(val_tok):,} val tokens; "
        f"{tcfg.batch_size} x {seq_len} = {tokens_per_step:,} tokens/step (micro-batch {micro}, accumulation {accum})\n"
        f"  peak LR {peak:g}, {total:,} steps = {total * tokens_per_step:,} tokens"
        + (f", resuming at step {step} from {resume_path}" if resume_path else "")
        + f"\n  output {out}",
        flush=True,
    )

    def save(dest: Path, last: dict) -> Path:
        if tcfg.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(model, options=opts)
            osd = get_optimizer_state_dict(model, opt, options=opts)
        else:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            msd, osd = bare.state_dict(), get_optimizer_state_dict(bare, opt)
        if rt.is_main:
            rng = {"torch_cpu": torch.get_rng_state()}
            if rt.device.type == "cuda":
                rng["torch_cuda"] = torch.cuda.get_rng_state(rt.device)
            ckpt_io.save_training_checkpoint(
                dest, model_state=msd, model_config=model_cfg, optimizer_state=osd, rng_state=rng,
                trainer_state=dict(
                    step=step, tokens=tokens, total_steps=total, elapsed_s=elapsed, train_time_s=train_time,
                    sampler=sampler.state_dict(), world_size=rt.world, train_config=tcfg.to_dict(), last=last,
                ),
            )
            if tcfg.keep_checkpoints and dest.name != "final":
                ckpt_io.prune_checkpoints(out, tcfg.keep_checkpoints)
        _barrier(rt)
        return dest

    def log(rec: dict) -> None:
        if not rt.is_main:
            return
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, rec["step"])

    bar = None
    if rt.is_main and tcfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc=model_cfg.arch)

    # -- the loop ----------------------------------------------------------------------------------------------------
    model.train()
    start_step = step
    val_loss = None
    stopped_by = "done"
    run_start = invocation_start = time.perf_counter()
    win_tokens, win_time, win_loss, win_steps = 0, 0.0, 0.0, 0
    with _StopFlag() as stop:
        while step < total:
            t0 = time.perf_counter()
            lr = lr_at(step, total, peak, tcfg.warmup_frac, tcfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            starts = sampler.next(tcfg.batch_size)
            loss_sum = torch.zeros((), device=rt.device)
            for a in range(accum):
                x = batch_for(starts, a)
                sync = a == accum - 1
                if tcfg.fsdp:
                    model.set_requires_gradient_sync(sync)
                ctx = model.no_sync() if (rt.world > 1 and not tcfg.fsdp and not sync) else contextlib.nullcontext()
                with ctx:
                    with _autocast(rt.device, tcfg.precision):
                        _, loss = model(x[:, :-1], x[:, 1:])
                    (loss / accum).backward()
                loss_sum += loss.detach()
            gnorm = opt.clip_grad_norm_(tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            dt = time.perf_counter() - t0
            train_time += dt
            win_tokens, win_time, win_steps = win_tokens + tokens_per_step, win_time + dt, win_steps + 1
            step_loss = loss_sum.item() / accum
            if not math.isfinite(step_loss):
                raise MemoryFormerError(
                    f"loss: became {step_loss} at step {step}; the newest checkpoint in {out} is intact "
                    f"(try a lower --lr or a --grad-clip)"
                )
            win_loss += step_loss
            now_elapsed = elapsed + (time.perf_counter() - run_start)

            # Every rank must agree on stopping: a stop request or the time budget on any rank stops all.
            over_time = tcfg.time_budget is not None and time.perf_counter() - invocation_start >= tcfg.time_budget
            flag = 2.0 * stop.requested + float(over_time)
            if rt.world > 1:
                flag = _all_reduce(torch.tensor([flag], device=rt.device), rt, "max").item()
            paused = tcfg.stop_after is not None and start_step < tcfg.stop_after <= step < total
            stopping = flag > 0 or step == total or paused
            do_eval = stopping or (tcfg.eval_every and step % tcfg.eval_every == 0)
            do_log = do_eval or step % tcfg.log_every == 0 or step == 1

            if do_log:
                lt = _all_reduce(torch.tensor([win_loss / win_steps], device=rt.device), rt).item() / rt.world
                gn = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
                rec = dict(step=step, loss=round(lt, 6), lr=lr, tokens=tokens,
                           tokens_per_s=round(win_tokens / max(win_time, 1e-9), 1),
                           grad_norm=round(float(gn), 6), elapsed_s=round(now_elapsed, 2))
                if do_eval and flag < 2:
                    val_loss = evaluate(model if tcfg.fsdp else bare, val_tok, starts_val, seq_len, micro,
                                        rt.device, tcfg.precision, rt)
                    rec.update(val_loss=round(val_loss, 6), val_ppl=round(math.exp(min(val_loss, 50.0)), 4))
                    if bar is not None:
                        bar.write(f"step {step}: train loss {lt:.4f}, val loss {val_loss:.4f}, val ppl {rec['val_ppl']:.2f}")
                    elif tcfg.verbose and rt.is_main:
                        print(f"step {step}/{total}: train loss {lt:.4f}, val loss {val_loss:.4f}, "
                              f"val ppl {rec['val_ppl']:.2f}, {rec['tokens_per_s']:,.0f} tokens/s", flush=True)
                log(rec)
                last = rec
                win_tokens, win_time, win_loss, win_steps = 0, 0.0, 0.0, 0
            if bar is not None:
                bar.update(1)
                if "loss" in last:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}", refresh=False)

            elapsed = elapsed + (time.perf_counter() - run_start)
            run_start = time.perf_counter()
            if flag >= 2:
                stopped_by = "interrupt"
                break
            if flag >= 1:
                stopped_by = "time_budget"
                break
            if paused:
                stopped_by = "stop_after"
                break
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < total:
                save(out / f"ckpt-{step}", last)

    if bar is not None:
        bar.close()
    checksums = _rank_checksums(model if tcfg.fsdp else bare, rt, tcfg.fsdp)
    if len(set(checksums)) > 1:
        raise RuntimeError(f"ranks disagree on the trained parameters (checksums {checksums})")
    if stopped_by in ("interrupt", "stop_after"):
        path = save(out / f"ckpt-{step}", last)
        if stopped_by == "interrupt":
            say(f"interrupted at step {step}: checkpoint saved to {path}; continue with: memoryformer train --resume {out}")
    else:
        path = save(out / "final", last)
    if tb is not None:
        tb.close()
    summary = dict(
        out=str(out), checkpoint=str(path), steps=step, total_steps=total, tokens=tokens,
        elapsed_s=round(elapsed, 2), tokens_per_s=round(tokens / max(train_time, 1e-9), 1),
        train_loss=last.get("loss"), val_loss=val_loss,
        val_ppl=math.exp(min(val_loss, 50.0)) if val_loss is not None else None,
        params=nparams, stopped_by=stopped_by, arch=model_cfg.arch, rank_checksums=checksums,
    )
    if rt.is_main:
        ckpt_io._replace_file(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=1) + "\n"))
        if stopped_by != "interrupt" and val_loss is not None:
            say(f"{'done' if stopped_by == 'done' else 'paused'}: {step} steps, {tokens:,} tokens, val loss {val_loss:.4f} (ppl {summary['val_ppl']:.2f}); "
                f"model in {path}")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Command line (`memoryformer train`)

_HELP = {
    "data": "training text: a .jsonl[.xz|.gz] or .txt file, a folder of them (train/val by file name), a glob, "
    "or hf:NAME[:CONFIG]; default: the bundled Gutenberg sample",
    "val_data": "validation text (default: the data's val files, else its held-out last 1%%)",
    "out": "run folder (default runs/<config>)",
    "batch_size": "sequences per optimizer step over all ranks (default 32)",
    "micro_batch_size": "sequences per forward per rank; the rest is gradient accumulation",
    "seq_len": "tokens per sequence (default: the model's max_seq_len)",
    "lr": "peak LR (default: 1e-3/6e-4/3e-4 by width for the dense control, 3x that for MemoryFormer)",
    "min_lr_ratio": "cosine floor as a fraction of the peak (default 0.1)",
    "warmup_frac": "warmup as a fraction of all steps (default 0.01)",
    "weight_decay": "AdamW weight decay (default 0.1)",
    "exclude_tables_from_wd": "no weight decay on the memory tables",
    "beta1": "AdamW beta1 (default 0.9)",
    "beta2": "AdamW beta2 (default 0.95)",
    "eps": "AdamW epsilon (default 1e-8)",
    "grad_clip": "max gradient norm, 0 = off (default 1.0)",
    "table_optim": "memory-table optimizer: adamw (the paper's recipe, default), rowwise (one second moment per "
    "row segment, only hit rows move) or partial-rowwise-adam (rowwise + per-element momentum)",
    "table_dtype": "memory-table storage: fp32 (default) or bf16 (fp32 sums, stochastically rounded updates)",
    "max_steps": "run length in optimizer steps",
    "max_tokens": "run length in training tokens (e.g. 5e6); default: 20 per parameter of the dense control",
    "time_budget": "run length in time (e.g. 600, 10m, 2h): sets the schedule if no steps/tokens are given, "
    "else stops early",
    "stop_after": "pause after this step with a checkpoint (resume continues)",
    "eval_every": "steps between validations, 0 = only at the end (default 200)",
    "eval_tokens": "validation tokens per evaluation (default 65536)",
    "log_every": "steps between metrics.jsonl lines (default 10)",
    "ckpt_every": "steps between OUT/ckpt-<step>/ checkpoints, 0 = only OUT/final/ (default 1000)",
    "keep_checkpoints": "keep only the newest N ckpt-<step>/ folders",
    "seed": "seed of the initialisation and of the data order (default 0)",
    "deterministic": "deterministic algorithms: bit-identical reruns and resumes on CPU",
    "device": "auto (CUDA if present), cpu or cuda",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16",
    "fsdp": "shard with FSDP2 instead of DDP under torchrun",
    "tensorboard": "also write TensorBoard logs to OUT/tensorboard",
    "progress": "show the progress bar",
    "verbose": "print the run header and evaluations",
    "cache_dir": "token cache folder (default $MEMORYFORMER_CACHE or ~/.cache/memoryformer)",
    "val_fraction": "held-out tail when the data has no validation files (default 0.01)",
}


def _number(kind):
    def parse(text: str):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if kind is int:
            if not v.is_integer():
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
            return int(v)
        return v

    parse.__name__ = kind.__name__
    return parse


def parse_duration(text: str) -> float:
    """Seconds from "600", "90s", "10m", "1.5h"."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([smh]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 600, 90s, 10m or 2h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `memoryformer train` flags: --config, --set, --resume, and one flag per TrainConfig field."""
    p.add_argument("--config", metavar="PRESET|FILE",
                   help="a preset (micro, tiny, micro-dense, pythia-70m, ...) or a YAML/JSON file with "
                   "'preset:', model fields and a 'train:' section (default micro)")
    p.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, e.g. --set n_layer=2 (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR (its newest checkpoint) or from a checkpoint folder")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if "bool" in kind:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=_HELP[f.name])
        elif f.name == "time_budget":
            p.add_argument(flag, dest=f.name, type=parse_duration, default=None, metavar="TIME", help=_HELP[f.name])
        elif "int" in kind:
            p.add_argument(flag, dest=f.name, type=_number(int), default=None, metavar="N", help=_HELP[f.name])
        elif "float" in kind:
            p.add_argument(flag, dest=f.name, type=_number(float), default=None, metavar="X", help=_HELP[f.name])
        else:
            choices = {"device": DEVICES, "precision": PRECISIONS, "table_optim": TABLE_OPTIMS,
                       "table_dtype": TABLE_DTYPES}.get(f.name)
            p.add_argument(flag, dest=f.name, default=None, choices=choices, help=_HELP[f.name])


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(args: argparse.Namespace) -> dict:
    """Run `memoryformer train` from parsed arguments; returns the summary (exit 130 if interrupted)."""
    try:
        return _main(args)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: checkpoints stay whole
        print("\nmemoryformer: interrupted", file=sys.stderr)
        sys.exit(130)


def _main(args: argparse.Namespace) -> dict:
    explicit = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    model_set = _parse_sets(args.model_set)
    if args.resume:
        model_cfg = None
        if args.config:
            model_cfg, file_train = load_run_config(args.config, model_set)
            explicit = {**file_train, **explicit}
        elif model_set:
            saved = ModelConfig.load(ckpt_io.find_checkpoint(args.resume) / ckpt_io.CONFIG)
            model_cfg = saved.replace(**_coerce_model_fields(model_set))
        cfg, tcfg, path = resume_config(args.resume, model_cfg, **explicit)
        summary = train(cfg, tcfg, resume=path)
    else:
        name = args.config or "micro"
        cfg, file_train = load_run_config(name, model_set)
        merged = {**file_train, **explicit}
        merged.setdefault("out", str(Path("runs") / Path(name).stem))
        tcfg = TrainConfig.from_dict(merged, source=args.config or "flags")
        summary = train(cfg, tcfg)
    if summary["stopped_by"] == "interrupt":
        sys.exit(130)
    return summary
