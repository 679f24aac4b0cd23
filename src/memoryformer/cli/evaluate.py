"""`memoryformer eval`, `analyze`, `flops` and `memory`: flags and thin handlers."""

from __future__ import annotations

import json
import sys

from memoryformer.cli.args import add_tables, add_verify, image_file, number, positive
from memoryformer.config import TABLE_DTYPES, TABLE_OPTIMS, ConfigError, MemoryFormerError


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
    add_tables(p, "evaluate the model frozen for inference, as memoryformer.load(..., tables=) loads it")
    p.add_argument("--harness", choices=("memoryformer", "lm-eval"), default="memoryformer",
                   help="score with our scorer (default) or through lm-evaluation-harness (extra [eval])")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_verify(p)


def run_eval(args) -> dict:
    import time

    import torch

    from memoryformer.checkpoint import load_model
    from memoryformer.evaluate import evaluate_tasks, format_results, parse_tasks, perplexity
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
    from memoryformer.integrity import check_apart, ensure_dir

    positive(batch_size=args.batch_size, tokens=args.tokens)
    folders = analyze.output_folders(args.checkpoint, args.out)
    for _, out in folders:  # an unusable --out fails before any work
        check_apart(out, {"--data": args.data, **{f"--checkpoint {c}": c for c in args.checkpoint}})
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


MAX_FLOPS_SEQ_LEN = 1 << 24  # 16 M tokens: beyond any context a model here runs; larger is a typo, not a question


def add_flops(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (table1, figure1, bytes)")
    p.add_argument("--plot", metavar="PATH", help="write Figure 1 as a PNG")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence for Table 1 (default 2048)")


def run_flops(args) -> None:
    from memoryformer import flops

    positive(seq_len=args.seq_len)
    if args.seq_len > MAX_FLOPS_SEQ_LEN:
        raise ConfigError(f"seq-len: expected at most {MAX_FLOPS_SEQ_LEN:,} tokens, got {args.seq_len:,}")
    image_file(args.plot, "--plot")
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
    p.add_argument("--table-dtype", choices=TABLE_DTYPES, default="float32")
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
