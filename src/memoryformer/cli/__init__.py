"""`memoryformer` command line: every subcommand's flags, each handler a thin call into the library.

Errors caused by input (bad config, missing file, ...) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from memoryformer.cli.doctor import add_doctor, run_doctor
from memoryformer.cli.evaluate import (
    add_analyze,
    add_eval,
    add_flops,
    add_memory,
    run_analyze,
    run_eval,
    run_flops,
    run_memory,
)
from memoryformer.cli.inference import (
    add_export,
    add_generate,
    run_export,
    run_generate,
)
from memoryformer.cli.serve import add_serve, run_serve
from memoryformer.cli.train import (
    add_ablate,
    add_demo,
    add_train,
    run_ablate,
    run_demo,
    run_train,
)
from memoryformer.config import MemoryFormerError

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
    ("serve", add_serve, run_serve, "an OpenAI-compatible HTTP server (/v1/completions) over a checkpoint"),
    ("doctor", add_doctor, run_doctor, "the environment in one screen: versions, CPU features, kernels, GPU"),
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
