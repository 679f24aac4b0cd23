"""`memoryformer generate` and `export`: flags and thin handlers."""

from __future__ import annotations

from pathlib import Path

from memoryformer.cli.args import add_tables, add_verify
from memoryformer.config import (
    ConfigError,
    MemoryFormerError,
)
from memoryformer.integrity import check_apart


def add_generate(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_tables(p, "load for inference with the memory tables in this dtype; on the CPU the compiled decode engine "
               "then runs every step (int4: the eager model)")
    add_verify(p)


def run_generate(args) -> str:
    import torch

    from memoryformer.checkpoint import load_model
    from memoryformer.data import EOT_ID, encode
    from memoryformer.generate import stream

    if args.seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {args.seed}")
    ids = encode(args.prompt)
    if not ids:
        raise MemoryFormerError("prompt: empty (give at least one character of text to continue)")
    model = load_model(args.checkpoint, device=args.device, verify=args.verify, tables=args.tables)
    idx = torch.tensor([ids], device=args.device)
    try:
        tokens = stream(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, eos_token=EOT_ID, generator=torch.Generator().manual_seed(args.seed))
        return args.prompt + _print_as_generated(args.prompt, tokens)
    except ValueError as e:
        raise MemoryFormerError(str(e)) from None


def _print_as_generated(prompt: str, tokens) -> str:
    """Print the prompt, then the text of each token as soon as it is whole (a token may end inside a UTF-8
    character); Ctrl-C stops after the text so far, with one line saying so. Returns the generated text."""
    import sys

    from memoryformer.data import EOT_ID, decode

    out, pending = [], []  # pending: tokens whose bytes do not yet end on a whole character
    print(prompt, end="", flush=True)
    try:
        for t in tokens:
            if int(t[0, 0]) == EOT_ID:
                break
            out.append(int(t[0, 0]))
            pending.append(out[-1])
            piece = decode(pending)  # byte-level tokens: the pieces concatenate to decode(out)
            if not piece.endswith("\ufffd"):
                print(piece, end="", flush=True)
                pending = []
    except KeyboardInterrupt:
        print(f"\nmemoryformer: interrupted after {len(out)} tokens", file=sys.stderr)
        sys.exit(130)
    print(decode(pending), flush=True)
    return decode(out)


def add_export(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or new)")
    add_tables(p, "freeze the memory tables to this dtype, converted tensor by tensor; memoryformer.load reads the "
               "copy as it is")
    p.add_argument("--hf", action="store_true", help="save_pretrained folder + tokenizer for transformers (extra [hf])")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    add_verify(p)


def run_export(args) -> None:
    from memoryformer.checkpoint import WEIGHTS, load_model, save_model

    out = Path(args.out)
    check_apart(out, {"--checkpoint": args.checkpoint})  # --force or not: never over its own input
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
