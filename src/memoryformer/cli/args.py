"""Value parsers and shared flags of the command line."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from memoryformer.config import (
    ConfigError,
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


def image_file(path: str | None, flag: str) -> None:
    """A figure's output path: a file name with an image suffix, not a folder (`--plot out/` must not write
    `out/.png`), else one line naming the flag."""
    if path is None:
        return
    suffixes = (".png", ".pdf", ".svg", ".jpg")
    if path.endswith(("/", "\\")) or Path(path).is_dir():
        raise ConfigError(f"{flag}: expected a file name such as figure1.png, got the folder {path!r}")
    if Path(path).suffix.lower() not in suffixes:
        raise ConfigError(f"{flag}: expected a file name ending in {', '.join(suffixes)}, got {path!r}")


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


TABLES_HELP = ("int8: one fp32 scale per row; int4: two values per byte, one fp16 scale per 64; int8 / bfloat16 also "
               "quantise the LM head and embedding, int4 tables come with an int8 head and embedding")


def add_tables(p: argparse.ArgumentParser, what: str) -> None:
    """`--tables DTYPE`, the one flag for a model frozen for inference; `what` says what the command does with it."""
    from memoryformer.config import INFERENCE_DTYPES

    p.add_argument("--tables", choices=INFERENCE_DTYPES, help=f"{what} ({TABLES_HELP}); default: as stored")
