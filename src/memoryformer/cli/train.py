"""`memoryformer train`, `demo` and `ablate`: flags and thin handlers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from memoryformer.cli.args import duration, key_values, number, positive
from memoryformer.config import (
    DENSE_CONTROL,
    DEVICES,
    PRECISIONS,
    TABLE_DTYPES,
    TABLE_OPTIMS,
    ConfigError,
    MemoryFormerError,
    ModelConfig,
    TrainConfig,
    load_run_config,
)
from memoryformer.integrity import check_apart

TRAIN_HELP = {
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
    "table_dtype": "memory-table storage: float32 (default) or bfloat16 (fp32 sums, stochastically rounded updates)",
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
    "precision": "auto (bfloat16 autocast on CUDA, float32 on CPU), float32 or bfloat16",
    "fsdp": "shard with FSDP2 instead of DDP under torchrun",
    "tensorboard": "also write TensorBoard logs to OUT/tensorboard",
    "progress": "show the progress bar",
    "verbose": "print the run header and evaluations",
    "cache_dir": "token cache folder (default $MEMORYFORMER_CACHE or ~/.cache/memoryformer); never read from a "
    "checkpoint: pass it again with --resume",
    "val_fraction": "held-out tail when the data has no validation files (default 0.01)",
    "max_skipped_steps": "stop after this many consecutive steps skipped for a non-finite loss or gradient norm "
    "(default 5)",
    "verify": "check the checkpoint resumed from and the token cache against their SHA-256 (default; --no-verify "
    "skips it; SHA-256 costs about 2-3 s per GB on one core)",
    "force_memory": "start even when the estimated training memory (memoryformer memory) exceeds the memory "
    "available",
}
CHOICES = {"device": DEVICES, "precision": PRECISIONS, "table_optim": TABLE_OPTIMS, "table_dtype": TABLE_DTYPES}


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PRESET|FILE", help="a preset (micro, tiny, micro-dense, pythia-70m, ...) or "
                   "a YAML/JSON file with 'preset:', model fields and a 'train:' section (default micro)")
    p.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, e.g. --set n_layer=2 (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR (its newest checkpoint) or from a checkpoint")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="train as N processes on this machine "
                   "(DDP, or FSDP2 with --fsdp), as torchrun --nproc_per_node=N does, with a clean Ctrl-C")
    for f in fields(TrainConfig):
        flag, kind, help_text = "--" + f.name.replace("_", "-"), str(f.type), TRAIN_HELP.get(f.name, "")
        if "bool" in kind:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "time_budget":
            p.add_argument(flag, dest=f.name, type=duration, default=None, metavar="TIME", help=help_text)
        elif "int" in kind or "float" in kind:
            t = int if "int" in kind else float
            p.add_argument(flag, dest=f.name, type=number(t), default=None, metavar="N" if t is int else "X",
                           help=help_text)
        else:
            p.add_argument(flag, dest=f.name, default=None, choices=CHOICES.get(f.name), help=help_text)


def run_train(args) -> dict:
    from memoryformer import checkpoint as ckpt_io
    from memoryformer.train import resume_config, train

    if args.nproc_per_node < 1:
        raise ConfigError(f"nproc-per-node: expected a positive number of processes, got {args.nproc_per_node}")
    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:  # under torchrun (or a rank of ours): train
        from memoryformer.launch import run_local

        sys.exit(run_local(args.nproc_per_node, args.argv))
    explicit = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    model_set = key_values(args.model_set)
    try:
        if args.resume:
            model_cfg = None
            if args.config:
                model_cfg, file_train = load_run_config(args.config, model_set)
                explicit = {**file_train, **explicit}
            elif model_set:
                found = ckpt_io.find_resumable(args.resume, verify=explicit.get("verify", True))
                saved = ModelConfig.load(found / ckpt_io.CONFIG)
                model_cfg = saved.replace(**model_set)
            cfg, tcfg, path = resume_config(args.resume, model_cfg, **explicit)
            summary = train(cfg, tcfg, resume=path)
        else:
            name = args.config or "micro"
            cfg, file_train = load_run_config(name, model_set)
            merged = {**file_train, **explicit}
            merged.setdefault("out", str(Path("runs") / Path(name).stem))
            summary = train(cfg, TrainConfig.from_dict(merged, source=args.config or "flags"))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: checkpoints stay whole
        print("\nmemoryformer: interrupted", file=sys.stderr)
        sys.exit(130)
    if summary["stopped_by"] == "interrupt":
        sys.exit(130)
    return summary


# -- demo, eval, ablate, analyze -----------------------------------------------------------------------------------


def add_demo(p) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="time budget on two idle CPU cores, which sets the "
                   "token budget (default 10); a busier machine takes longer for the same result")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--preset", default="micro", choices=sorted(DENSE_CONTROL), help="MemoryFormer preset (default micro)")
    p.add_argument("--data", default=None, help="training text (default: the bundled sample)")
    p.add_argument("--tokens", type=number(int), default=None, help="training tokens per model (default: from --minutes)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens per evaluation (default 32768)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")


def run_demo(args) -> dict:
    from memoryformer.studies.demo import run_demo as demo

    if not args.minutes > 0:
        raise ConfigError(f"minutes: expected a positive number (got {args.minutes})")
    if args.tokens is not None and args.tokens < 1:
        raise ConfigError(f"tokens: expected a positive number (got {args.tokens})")
    positive(batch_size=args.batch_size, eval_tokens=args.eval_tokens)
    check_apart(args.out, {"--data": args.data})
    return demo(args.minutes, args.out, preset=args.preset, data=args.data, tokens=args.tokens,
                batch_size=args.batch_size, eval_tokens=args.eval_tokens, device=args.device, seed=args.seed,
                progress=args.progress)


def add_ablate(p) -> None:
    from memoryformer.studies.ablate import SUITE_NAMES

    p.add_argument("--suite", required=True, help=f"{', '.join(SUITE_NAMES)} or all (comma-separated for several)")
    p.add_argument("--scale", default="micro", help="MemoryFormer preset the variants start from (default micro)")
    p.add_argument("--tokens", type=number(int), default=300_000, help="training tokens per variant (default 300000)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (default 16)")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="validation tokens per variant (default 65536)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="training text (as train --data; default: the bundled sample)")
    p.add_argument("--out", default="runs/ablations", help="run folders go to OUT/<scale>/<suite>/<variant>")
    p.add_argument("--results-dir", metavar="DIR", help="also write ablations_<suite>_<scale>.{md,json} here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the results as JSON lines, one per suite")
    p.add_argument("--no-progress", action="store_true")


def run_ablate(args) -> list[dict]:
    from memoryformer.studies import ablate

    positive(tokens=args.tokens, batch_size=args.batch_size, eval_tokens=args.eval_tokens)
    names = list(ablate.SUITE_NAMES) if args.suite == "all" else [s.strip() for s in args.suite.split(",") if s.strip()]
    for n in names:
        if n not in ablate.SUITE_NAMES:
            raise MemoryFormerError(f"suite: unknown suite {n!r} (valid: {', '.join(ablate.SUITE_NAMES)}, all)")
    check_apart(args.out, {"--data": args.data})
    if args.results_dir:
        check_apart(args.results_dir, {"--data": args.data})
    out = []
    for n in names:
        res = ablate.run_suite(n, scale=args.scale, tokens=args.tokens, out=args.out, seed=args.seed,
                               batch_size=args.batch_size, eval_tokens=args.eval_tokens, data=args.data,
                               device=args.device, progress=not args.no_progress,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
        if args.results_dir:
            ablate.write_results(res, args.results_dir)
        print(json.dumps(res) if args.json else ablate.format_markdown(res), flush=True)
        out.append(res)
    return out
