"""`memoryformer` command line. Each subcommand is a thin wrapper over an importable function.

Errors caused by input (bad config, missing file, ...) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from memoryformer.config import MemoryFormerError, get_config


def cmd_flops(args: argparse.Namespace) -> None:
    from memoryformer import flops

    if args.json:
        table = [{k: r[k] for k in ("model", "flops_wo_attn", "flops_total")} for r in flops.table1(args.seq_len)]
        bytes_ = {n: {"decode": flops.weight_bytes(get_config(n), 1),
                      f"prefill_{args.seq_len}": flops.weight_bytes(get_config(n), args.seq_len)}
                  for n in ("micro", "micro-dense", "tiny", "pythia-70m", "small", "pythia-160m", "base", "pythia-410m")}
        print(json.dumps({"table1": table, "figure1": flops.figure1(), "notes": flops.PAPER_MISMATCH,
                          "bytes_per_block_bf16": bytes_}))
    else:
        print(flops.report(args.seq_len))
    if args.plot:
        flops.plot_figure1(args.plot)
        if not args.json:
            print(f"\nFigure 1 written to {args.plot}")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from memoryformer.checkpoint import load_model
    from memoryformer.data import decode, encode, get_tokenizer
    from memoryformer.generate import generate

    model = load_model(args.checkpoint, device=args.device)
    eos = get_tokenizer().token_to_id("<|endoftext|>")
    idx = torch.tensor([encode(args.prompt)], device=args.device)
    try:
        out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_token=eos, generator=torch.Generator().manual_seed(args.seed))
    except ValueError as e:
        raise MemoryFormerError(str(e)) from None
    print(args.prompt + decode(out[0, idx.shape[1]:].tolist()))


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from memoryformer.checkpoint import WEIGHTS, load_model, save_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise MemoryFormerError(f"{out}: exists and is not empty (pass --force to write into it)")
    model = load_model(args.checkpoint)
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
    if args.tables:
        from memoryformer.layers import to_inference

        to_inference(model, args.tables)
    save_model(model, out)
    print(f"{args.checkpoint} -> {out} ({(out / WEIGHTS).stat().st_size / 1e6:,.1f} MB"
          f"{', tables ' + args.tables if args.tables else ''})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("flops", help="the paper's FLOP counts (Table 1, Figure 1) and table memory per preset")
    p.add_argument("--json", action="store_true", help="print one JSON object (table1, figure1)")
    p.add_argument("--plot", metavar="PATH", help="write Figure 1 as a PNG")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence for Table 1 (default 2048)")
    p.set_defaults(func=cmd_flops)

    from memoryformer import ablate, analyze, demo, evaluate, train

    # Subcommands whose module owns its flags (`add_arguments`) and its entry point (`main(args)`).
    for name, module, help_text in (
        ("train", train, "train a model on text (the paper's recipe; torchrun for several processes)"),
        ("demo", demo, "train micro MemoryFormer and its dense control on the bundled text and compare"),
        ("eval", evaluate, "zero-shot benchmarks (lm-eval prompts and metrics) and perplexity of a checkpoint"),
        ("ablate", ablate, "the paper's ablations (Tables 3-6, weighting): train each variant, tabulate"),
        ("analyze", analyze, "bucket usage of the Memory Layers (Figure 4): histograms, unused rows, entropy"),
    ):
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.main)

    p = sub.add_parser("generate", help="sample a continuation of a prompt from a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a checkpoint's model for inference (int8/bf16 tables) or for transformers")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or new)")
    p.add_argument("--tables", choices=("int8", "bfloat16", "float16", "float32"),
                   help="freeze the memory tables to this dtype (int8: one fp32 scale per row); memoryformer.load reads it")
    p.add_argument("--hf", action="store_true", help="save_pretrained folder + tokenizer for transformers (extra [hf])")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MemoryFormerError as e:
        print(f"memoryformer: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"memoryformer: error: {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
