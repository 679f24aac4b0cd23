"""`memoryformer` command line. Each subcommand is a thin wrapper over an importable function.

Errors caused by input (bad config, missing file, ...) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from memoryformer.config import MemoryFormerError


def cmd_flops(args: argparse.Namespace) -> None:
    from memoryformer import flops

    if args.json:
        table = [{k: r[k] for k in ("model", "flops_wo_attn", "flops_total")} for r in flops.table1(args.seq_len)]
        print(json.dumps({"table1": table, "figure1": flops.figure1(), "notes": flops.PAPER_MISMATCH}))
    else:
        print(flops.report(args.seq_len))
    if args.plot:
        flops.plot_figure1(args.plot)
        if not args.json:
            print(f"\nFigure 1 written to {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("flops", help="the paper's FLOP counts (Table 1, Figure 1) and table memory per preset")
    p.add_argument("--json", action="store_true", help="print one JSON object (table1, figure1)")
    p.add_argument("--plot", metavar="PATH", help="write Figure 1 as a PNG")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence for Table 1 (default 2048)")
    p.set_defaults(func=cmd_flops)
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
