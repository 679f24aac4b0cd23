"""`memoryformer` command line: every subcommand's flags, each handler a thin call into the library.

Errors caused by input (bad config, missing file, ...) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from memoryformer.config import (
    DENSE_CONTROL,
    DEVICES,
    INFERENCE_DTYPES,
    PRECISIONS,
    TABLE_DTYPES,
    TABLE_OPTIMS,
    ConfigError,
    MemoryFormerError,
    ModelConfig,
    TrainConfig,
    load_run_config,
)

# -- value parsers -----------------------------------------------------------------------------------------------


def number(kind):
    """argparse type: "5e6" -> 5000000 for integers, any float for floats."""
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


def duration(text: str) -> float:
    """Seconds from "600", "90s", "10m", "1.5h"."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([smh]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 600, 90s, 10m or 2h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def positive(**flags) -> None:
    """Each integer flag given as a keyword is >= 1 (None: not given), else one line naming it."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise ConfigError(f"{name.replace('_', '-')}: expected a positive integer, got {value}")


def key_values(items: list[str], flag: str = "--set") -> dict:
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip checking the checkpoint against "
                   "its manifest.json (SHA-256, about 2-3 s per GB) and its tensors for NaN/inf")


# -- train -------------------------------------------------------------------------------------------------------

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
    "cache_dir": "token cache folder (default $MEMORYFORMER_CACHE or ~/.cache/memoryformer); never read from a "
    "checkpoint: pass it again with --resume",
    "val_fraction": "held-out tail when the data has no validation files (default 0.01)",
    "max_skipped_steps": "stop after this many consecutive steps skipped for a non-finite loss or gradient norm "
    "(default 5)",
    "verify": "check the checkpoint resumed from and the token cache against their SHA-256 (default; --no-verify "
    "skips it; SHA-256 costs about 2-3 s per GB on one core)",
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
    return demo(args.minutes, args.out, preset=args.preset, data=args.data, tokens=args.tokens,
                batch_size=args.batch_size, eval_tokens=args.eval_tokens, device=args.device, seed=args.seed,
                progress=args.progress)


def add_eval(p) -> None:
    from memoryformer.evaluate.tasks import ALL_TASKS

    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder (model.safetensors + config.json)")
    p.add_argument("--tasks", metavar="LIST", help=f"comma-separated: {', '.join(ALL_TASKS)} (alias lambada), or all; "
                   "default: the paper's six (none when only --data is given)")
    p.add_argument("--data", metavar="PATH", help="also report perplexity of this .jsonl[.xz|.gz] / .txt file or folder "
                   "(\"sample\": the bundled validation books)")
    p.add_argument("--data-dir", metavar="DIR", help="benchmark folder (docs/EVALUATION.md; default "
                   "$MEMORYFORMER_EVAL_DIR, else lm-eval's Hugging Face datasets, cached by `datasets`)")
    p.add_argument("--limit", type=int, metavar="N", help="first N examples of each task")
    p.add_argument("--max-tokens", type=number(int), metavar="N", help="perplexity over at most N tokens of --data "
                   "(windows spread over the text, as training's validation)")
    p.add_argument("--seq-len", type=int, metavar="N", help="perplexity window (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--tables", choices=INFERENCE_DTYPES, help="evaluate the model frozen for inference: memory tables "
                   "in this dtype (int8: one scale per row), the LM head and embedding int8 / bfloat16 with int8 / "
                   "bfloat16 tables, as memoryformer.load(..., tables=) loads it; default: as stored")
    p.add_argument("--harness", choices=("memoryformer", "lm-eval"), default="memoryformer",
                   help="score with our scorer (default) or through lm-evaluation-harness (extra [eval])")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_verify(p)


def run_eval(args) -> dict:
    import time

    import torch

    from memoryformer.checkpoint import load_model
    from memoryformer.evaluate import (
        evaluate_tasks,
        format_results,
        parse_tasks,
        perplexity,
    )
    from memoryformer.evaluate.tasks import check_sources

    tasks = parse_tasks(args.tasks) if (args.tasks or not args.data) else []
    positive(batch_size=args.batch_size, seq_len=args.seq_len, limit=args.limit, max_tokens=args.max_tokens)
    if tasks:
        check_sources(tasks, args.data_dir)  # a missing file or dataset fails before the model loads
    try:
        torch.device(args.device)
    except RuntimeError:
        raise MemoryFormerError(f"device: {args.device!r} is not a torch device (cpu, cuda, cuda:0, ...)") from None
    model = load_model(args.checkpoint, device=args.device, verify=args.verify, tables=args.tables)
    progress, out, t0 = not args.no_progress, {}, time.perf_counter()
    if tasks:
        kw = dict(data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size, device=args.device,
                  progress=progress)
        if args.harness == "lm-eval":
            try:
                from memoryformer.evaluate.lm_eval_adapter import run_lm_eval
            except ImportError as e:
                raise MemoryFormerError(f"harness lm-eval: {e}") from None
            out = run_lm_eval(model, tasks, **kw)
        else:
            out = evaluate_tasks(model, tasks, **kw)
    ppl = None
    if args.data:
        ppl = perplexity(model, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len,
                         batch_size=max(1, args.batch_size // 8), device=args.device, progress=progress)
    if args.json:
        clean = {t: {k: v for k, v in r.items() if k != "seconds"} for t, r in out.items()}
        if ppl is not None:
            clean = {**clean, "perplexity": ppl} if clean else ppl
        print(json.dumps(clean))
    else:
        if out:
            print(format_results(out))
        if ppl is not None:
            print(f"perplexity of {args.data}: {ppl['ppl']:.3f} over {ppl['tokens']:,} tokens ({ppl['windows']} "
                  f"windows of {ppl['seq_len'] + 1} tokens)")
        print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return {"tasks": out, "perplexity": ppl}


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


def add_analyze(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", action="append",
                   help="checkpoint folder (repeat to analyse several; each gets OUT/<folder name>/)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where buckets.json, buckets.png (hits per row), scores.png (weight histograms) and "
                        "bucket_counts.npz go")
    p.add_argument("--data", metavar="SOURCE", help="text whose validation split is hashed (as train --data; "
                   "default: the bundled sample's validation books)")
    p.add_argument("--tokens", type=number(int), default=262_144, help="tokens to hash (default 262144)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    add_verify(p)


def run_analyze(args) -> list[dict]:
    from memoryformer import analyze
    from memoryformer.integrity import ensure_dir

    positive(batch_size=args.batch_size, tokens=args.tokens)
    folders = analyze.output_folders(args.checkpoint, args.out)
    for _, out in folders:  # an unusable --out fails before any work
        ensure_dir(out, "out")
    results = []
    for ck, out in folders:
        s = analyze.analyze_checkpoint(ck, out, data=args.data, n_tokens=args.tokens, batch_size=args.batch_size,
                                       device=args.device, progress=not args.no_progress, verify=args.verify)
        results.append(s)
        if args.json:
            print(json.dumps({"checkpoint": ck, "by_kind": s["by_kind"], "tokens": s["tokens"]}))
        else:
            print(f"{ck} -> {out}\n{analyze.format_summary(s)}")
    return results


# -- flops, generate, export ---------------------------------------------------------------------------------------


def add_flops(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (table1, figure1, bytes)")
    p.add_argument("--plot", metavar="PATH", help="write Figure 1 as a PNG")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence for Table 1 (default 2048)")


def run_flops(args) -> None:
    from memoryformer import flops

    positive(seq_len=args.seq_len)
    print(json.dumps(flops.as_dict(args.seq_len)) if args.json else flops.report(args.seq_len))
    if args.plot:
        flops.plot_figure1(args.plot)
        if not args.json:
            print(f"\nFigure 1 written to {args.plot}")


def add_memory(p) -> None:
    p.add_argument("config", metavar="PRESET", help="a preset (micro, tiny, small, base, pythia-70m, ...)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch in sequences (default 1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's max_seq_len)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--table-optim", choices=TABLE_OPTIMS, default=None, help="one option (default: a table of all)")
    p.add_argument("--table-dtype", choices=TABLE_DTYPES, default="fp32")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda adds the runtime and a 10%% reserve; cpu counts sparse table rows (default cuda)")
    p.add_argument("--gpu-mem", default="80GB", help="GPU size to check the fit against (default 80GB)")


def run_memory(args) -> None:
    from memoryformer import footprint
    from memoryformer.config import get_config

    positive(batch=args.batch, accum=args.accum, seq_len=args.seq_len)
    get_config(args.config)  # an unknown preset: one line naming it
    try:
        footprint.parse_bytes(args.gpu_mem)
    except ValueError:
        raise ConfigError(f"--gpu-mem: expected a size such as 80GB or 8e10, got {args.gpu_mem!r}") from None
    kw = dict(accum=args.accum, device=args.device)
    if args.table_optim is None:
        print(footprint.options_table(args.config, args.batch, args.seq_len, gpu_mem=args.gpu_mem, **kw))
    else:
        print(footprint.report(args.config, args.batch, args.seq_len, args.table_optim, args.table_dtype,
                               gpu_mem=args.gpu_mem, **kw))


def add_generate(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tables", choices=INFERENCE_DTYPES, help="load for inference with the memory tables in this "
                   "dtype (int8 / bfloat16 also quantise the LM head and embedding): on the CPU the compiled decode "
                   "engine then runs every step; default: as stored")
    add_verify(p)


def run_generate(args) -> str:
    import torch

    from memoryformer.checkpoint import load_model
    from memoryformer.data import EOT_ID, decode, encode
    from memoryformer.generate import generate

    if args.seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {args.seed}")
    ids = encode(args.prompt)
    if not ids:
        raise MemoryFormerError("prompt: empty (give at least one character of text to continue)")
    model = load_model(args.checkpoint, device=args.device, verify=args.verify, tables=args.tables)
    idx = torch.tensor([ids], device=args.device)
    try:
        out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_token=EOT_ID, generator=torch.Generator().manual_seed(args.seed))
    except ValueError as e:
        raise MemoryFormerError(str(e)) from None
    text = args.prompt + decode(out[0, idx.shape[1] :].tolist())
    print(text)
    return text


def add_export(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or new)")
    p.add_argument("--tables", choices=INFERENCE_DTYPES, help="freeze the memory tables to this dtype (int8: one "
                   "fp32 scale per row; int8 / bfloat16 also quantise the LM head and embedding), converted tensor "
                   "by tensor; memoryformer.load reads it as it is")
    p.add_argument("--hf", action="store_true", help="save_pretrained folder + tokenizer for transformers (extra [hf])")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    add_verify(p)


def run_export(args) -> None:
    from memoryformer.checkpoint import WEIGHTS, load_model, save_model

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise MemoryFormerError(f"{out}: exists and is not an empty folder (pass --force to write into a folder)")
    model = load_model(args.checkpoint, verify=args.verify, tables=None if args.hf else args.tables)
    if model.config.arch != "memoryformer" and args.tables and not args.hf:
        raise MemoryFormerError(f"tables: {args.checkpoint} is a {model.config.arch} model with no memory tables "
                                "to convert; drop --tables")
    if args.hf:
        if args.tables:
            raise MemoryFormerError("tables: a Hugging Face export keeps trainable tables; drop --tables or --hf")
        try:
            import memoryformer.hf as mhf
        except ImportError as e:
            raise MemoryFormerError(str(e)) from None
        mhf.from_memoryformer(model).save_pretrained(out)
        mhf.tokenizer().save_pretrained(out)
        print(f"{args.checkpoint} -> {out} (transformers: AutoModelForCausalLM after `import memoryformer.hf`)")
        return
    note = ""
    if args.tables:
        note = f", tables {args.tables}"
    save_model(model, out)
    print(f"{args.checkpoint} -> {out} ({(out / WEIGHTS).stat().st_size / 1e6:,.1f} MB{note})")


# -- the parser ----------------------------------------------------------------------------------------------------

COMMANDS = (
    ("train", add_train, run_train, "train a model on text (the paper's recipe; torchrun for several processes)"),
    ("demo", add_demo, run_demo, "train micro MemoryFormer and its dense control on the bundled text and compare"),
    ("eval", add_eval, run_eval, "zero-shot benchmarks (lm-eval prompts and metrics) and perplexity of a checkpoint"),
    ("ablate", add_ablate, run_ablate, "the paper's ablations (Tables 2-6, weighting): train each variant, tabulate"),
    ("analyze", add_analyze, run_analyze, "bucket usage of the Memory Layers (Figure 4) and the weight distribution"),
    ("flops", add_flops, run_flops, "the paper's FLOP counts (Table 1, Figure 1) and table memory per preset"),
    ("memory", add_memory, run_memory, "training memory per preset and table option, and whether it fits a GPU"),
    ("generate", add_generate, run_generate, "sample a continuation of a prompt from a checkpoint"),
    ("export", add_export, run_export, "write a checkpoint for inference (int8/bf16 tables) or for transformers"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add, run, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(func=run)
    return parser


# PyTorch backs CPU allocations of 2 MB and more with transparent huge pages when this is set before its first
# allocation: a training step's large temporaries (the logits and their gradient, ~0.4 GB each for 2048 tokens at
# vocab 50 304) are then faulted in 2 MB at a time instead of 4 KB, 5x faster to allocate and fill on the 2-core
# VMs this was measured on. The command line sets it unless the user did (torch is imported only after this).
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def main(argv: list[str] | None = None) -> None:
    if "torch" not in sys.modules:
        os.environ.setdefault(THP_ENV, "1")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher passes on to its ranks
    try:
        args.func(args)
    except MemoryFormerError as e:
        print(f"memoryformer: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `memoryformer flops | head`: the reader left; say nothing more (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:  # a missing or unwritable path, a full disk, a file-size limit: the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"memoryformer: error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
