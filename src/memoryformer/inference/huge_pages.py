"""Memory Layer tables on transparent huge pages: random table rows then cost one TLB entry per 2 MB instead of
one per 4 KB (decode reads a few rows of every table per token). An explicit call: the streaming loader
(`load_for_inference`, so `memoryformer.load(path, tables=...)`) and `freeze` make it; anyone else may."""

from __future__ import annotations

import torch
import torch.nn as nn

from memoryformer.layers import MemoryLayer
from memoryformer.ops import cpu_ext


def huge_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on huge pages (2 MB-aligned, MADV_HUGEPAGE), or an ordinary one when the
    compiled kernels are unavailable."""
    ext = cpu_ext.get()
    return ext.huge_empty(list(shape), dtype) if ext is not None else torch.empty(tuple(shape), dtype=dtype)


def to_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor `t` on huge pages; `t` itself if the compiled kernels are unavailable or it is not on
    the CPU."""
    if cpu_ext.get() is None or t.device.type != "cpu":
        return t
    out = huge_empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def on_huge_pages(p: torch.Tensor) -> bool:
    return getattr(p, "_mf_huge", False)


def mark_huge(p: nn.Parameter) -> nn.Parameter:
    """Flag `p` as held on huge pages (`tables_to_huge_pages` then leaves it)."""
    p._mf_huge = cpu_ext.get() is not None
    return p


@torch.no_grad()
def tables_to_huge_pages(model: nn.Module) -> nn.Module:
    """Move every Memory Layer's CPU tables onto huge pages, in place (the model and its engines share them)."""
    for m in model.modules():
        if isinstance(m, MemoryLayer) and m.tables.device.type == "cpu" and not on_huge_pages(m.tables):
            m.tables = mark_huge(nn.Parameter(to_huge_pages(m.tables.detach()), requires_grad=m.tables.requires_grad))
    return model
