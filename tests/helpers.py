"""Plain builders shared by the tests (the fixtures built on them are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

import memoryformer as mf

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(n_layer=1, d_model=32, n_head=2, max_seq_len=32)  # the default tiny shape of these tests


def tiny_config(arch: str = "memoryformer", **overrides) -> mf.ModelConfig:
    """micro (or micro-dense) at TINY's shape, with overrides."""
    return mf.get_config("micro" if arch == "memoryformer" else "micro-dense", **{**TINY, **overrides})


def tiny_model(arch: str = "memoryformer", seed: int = 0, **overrides):
    """A freshly initialised tiny model in eval mode (seeded)."""
    torch.manual_seed(seed)
    return mf.build_model(tiny_config(arch, **overrides)).eval()
