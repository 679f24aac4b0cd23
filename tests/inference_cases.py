"""Shared helpers of the inference tests: a small MemoryFormer whose norms matter, and the relative error."""

import shutil

import pytest
import torch
import torch.nn as nn

import memoryformer as mf

needs_ext = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


def small_cfg(**kw):
    base = dict(n_layer=2, d_model=64, n_head=4, vocab_size=300, max_seq_len=40, tau=8)
    return mf.get_config("micro", **{**base, **kw})


def build(seed=0, **kw):
    torch.manual_seed(seed)
    model = mf.MemoryFormer(small_cfg(**kw)).eval()
    with torch.no_grad():  # norms away from their init so that they matter
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(std=0.1)
    return model


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
