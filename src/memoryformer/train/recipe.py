"""The paper's training recipe (spec §5): peak LRs, the cosine schedule, the run length, and the optimizer.

- AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices and (by default, as the authors do) the memory
  tables, none on biases and norms; gradient clipping at 1.0 (in the loop).
- Cosine decay to 0.1x the peak after a linear warmup over the first 1 % of steps.
- Peak LR by size: the Pythia LRs for the dense control (1e-3 up to d=512, 6e-4 at d=768, 3e-4 from d=1024) and
  3x that for MemoryFormer (paper §3.1: 3e-3 for MF-tiny).
"""

from __future__ import annotations

import math

import torch

from memoryformer.config import ModelConfig, TrainConfig


def dense_lr(cfg: ModelConfig) -> float:
    """Pythia's LR for a model of this width: 1e-3 (70M and smaller), 6e-4 (160M), 3e-4 (410M and larger)."""
    return 1e-3 if cfg.d_model <= 512 else 6e-4 if cfg.d_model <= 768 else 3e-4


def default_lr(cfg: ModelConfig) -> float:
    """Peak LR: the dense control's, times 3 for MemoryFormer (paper §3.1)."""
    return dense_lr(cfg) * (3.0 if cfg.arch == "memoryformer" else 1.0)


def warmup_steps(total: int, warmup_frac: float) -> int:
    return max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.01, min_ratio: float = 0.1) -> float:
    """LR of 0-based optimizer step `step` of `total`: linear warmup, then cosine from `peak` to `min_ratio*peak`."""
    warm = warmup_steps(total, warmup_frac)
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def default_tokens(cfg: ModelConfig) -> int:
    """The run length when none is given: 20 tokens per parameter of the dense control of this shape (about
    compute-optimal for it), the same for a MemoryFormer and its control so that their default runs compare."""
    from memoryformer.flops import layer_flops

    dense = cfg.replace(arch="transformer")
    n = sum(c.dense_params for c in layer_flops(dense, 1)) * cfg.n_layer
    return 20 * (n + 2 * cfg.vocab_size * cfg.d_model)


def build_optimizer(model, tcfg: TrainConfig, device: torch.device):
    """AdamW over `model.param_groups` (tables decayed unless `exclude_tables_from_wd`), the tables under the rule
    and storage of `tcfg.table_optim` / `tcfg.table_dtype` (`memoryformer.optim`; the default is plain AdamW)."""
    from memoryformer.optim import build_optimizer as build

    # fused on CUDA; foreach elsewhere (torch picks the per-tensor loop on CPU, which is several times slower)
    fused = device.type == "cuda" and not tcfg.fsdp
    return build(model, tcfg, lr=tcfg.lr or default_lr(model.config), fused=fused)
