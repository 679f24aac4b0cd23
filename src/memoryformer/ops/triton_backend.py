"""Registers the "triton" backend without importing triton (slow to import, absent on many CPU machines): the
kernels in `triton_kernels.py` load on first use. It runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (the interpreter the tests use).

A fast path proves itself before it is trusted: on the first CUDA use per (device, table dtype), `self_check` runs
a small forward and backward of the lookup and of the fused layer against `F.embedding_bag` (PyTorch's own kernel).
On a mismatch, or a kernel that fails to compile or run, one warning line is logged and layers on that device and
dtype use `F.embedding_bag` instead. The verdicts live in `_VERDICTS`, keyed by (device type, device index, dtype).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from memoryformer.ops.dispatch import lookup_embedding_bag, register_backend
from memoryformer.ops.reference import chunk_hash, row_scales

log = logging.getLogger("memoryformer")

_INSTALLED = importlib.util.find_spec("triton") is not None  # looks on disk only
# (device type, device index, table dtype) -> None (the kernels agree with F.embedding_bag) or why they do not
_VERDICTS: dict[tuple[str, int | None, torch.dtype], str | None] = {}
# Self-check tolerances, max |error| / max |embedding_bag|: fp32 accumulation on both sides; half-precision outputs
# and table gradients are rounded to 8 (bf16) or 11 (fp16) significant bits.
CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def triton_installed() -> bool:
    return _INSTALLED


def why_not(tables) -> str | None:
    if not _INSTALLED:
        return "triton is not installed"
    if tables.device.type == "cuda":
        return None
    if tables.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1)"


def _key(device: torch.device, dtype: torch.dtype) -> tuple[str, int | None, torch.dtype]:
    device = torch.device(device)
    return device.type, device.index, dtype


def verdict(device, dtype) -> str | None:
    """Why the Triton kernels are not trusted on (device, dtype) (None: trusted, or not checked yet)."""
    return _VERDICTS.get(_key(device, dtype))


def forget_verdicts() -> None:
    """Drop every cached self-check verdict (the next CUDA use checks again)."""
    _VERDICTS.clear()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check_pair(what: str, fn, ref, inputs: dict[str, torch.Tensor], gy: torch.Tensor) -> dict[str, float]:
    """Max-wise relative errors of fn's output and input gradients against ref's."""
    out = {}
    for name, f in (("got", fn), ("want", ref)):
        leaves = [t.detach().clone().requires_grad_() for t in inputs.values()]
        y = f(*leaves)
        out[name] = [y.detach(), *torch.autograd.grad(y, leaves, gy.to(y.dtype))]
    names = [f"{what} output", *(f"{what} grad {k}" for k in inputs)]
    return {k: _rel(g, w) for k, g, w in zip(names, out["got"], out["want"])}


def self_check(device, dtype: torch.dtype, *, lookup=None, layer=None, warn: bool = True) -> str | None:
    """Compare `lookup(codes, weights, tables)` and `layer(x, tables, bias, tau=, weighting=, temperature=)`
    (default: the Triton kernels) with `F.embedding_bag` on small inputs, forward and both gradients; record and
    return the verdict for (device, dtype): None when they agree, else the reason (also logged once if `warn`)."""
    if lookup is None or layer is None:
        from memoryformer.ops import triton_kernels

        lookup, layer = lookup or triton_kernels.lookup, layer or triton_kernels.layer_forward
    device, tau, K, h, N = torch.device(device), 8, 4, 96, 96  # h = 96: a masked tail in every tile width
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, K * tau, generator=g).to(device=device, dtype=dtype)
    tables = (0.5 * torch.randn(K, 2**tau, h, generator=g)).to(device=device, dtype=dtype)
    gy = torch.randn(N, h, generator=g).to(device)
    prec = torch.float64 if dtype == torch.float64 else torch.float32  # the kernels' accumulation
    codes, w = chunk_hash(x.detach().to(prec), tau, weighting="paper")

    def bag(c, w_, t):  # fp32 for half tables: embedding_bag has no half-precision weight gradient on CUDA
        return lookup_embedding_bag(c, w_.to(prec), t.to(prec)).to(t.dtype)

    def bag_layer(x_, t):
        return bag(*chunk_hash(x_.to(prec), tau, weighting="paper"), t)

    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            errs = _check_pair("lookup", lambda w_, t: lookup(codes, w_, t), lambda w_, t: bag(codes, w_, t),
                               dict(weights=w, tables=tables), gy)
            def fused(x_, t):
                return layer(x_, t, None, tau=tau, weighting="paper", temperature=1.0)

            errs.update(_check_pair("layer", fused, bag_layer, dict(x=x, tables=tables), gy))
        worst = max(errs, key=errs.get)
        tol = CHECK_TOL.get(dtype, 2e-2)
        reason = None if errs[worst] <= tol else f"{worst} off by {errs[worst]:.3g} (max-wise, tolerance {tol:g})"
    except Exception as e:  # a compile or launch error: the kernels cannot be trusted here either
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    _VERDICTS[_key(device, dtype)] = reason
    if reason is not None and warn:
        log.warning("memoryformer: Triton self-check against F.embedding_bag failed on %s %s tables (%s) -> "
                    "using 'embedding_bag'", device, str(dtype).removeprefix("torch."), reason)
    return reason


def _trusted(tables: torch.Tensor) -> bool:
    """Whether the kernels may run on these tables: checked once per CUDA (device, dtype) before first use."""
    key = _key(tables.device, tables.dtype)
    if key in _VERDICTS:
        return _VERDICTS[key] is None
    if tables.device.type != "cuda" or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return True  # the interpreter (tests) and traced or captured code: nothing can be launched to check
    return self_check(tables.device, tables.dtype) is None


def _fallback(codes, weights, tables):
    # fp32 rows: embedding_bag has no half-precision per_sample_weights gradient on CUDA (torch <= 2.11)
    if tables.dtype in (torch.float32, torch.float64):
        return lookup_embedding_bag(codes, weights, tables)
    return lookup_embedding_bag(codes, weights.float(), tables.float()).to(tables.dtype)


def register(name: str = "triton", **config) -> None:
    """(Re-)register the Triton backend under `name`; `config` (tiles, table_grad: see
    `triton_kernels.KernelConfig`) selects non-default kernels, run eagerly. `fuse_hash=False` leaves the hash to
    PyTorch (`chunk_hash`) and runs only the lookup kernels."""
    fuse_hash = config.pop("fuse_hash", True)

    def lookup(codes, weights, tables):
        if not _trusted(tables):
            return _fallback(codes, weights, tables)
        from memoryformer.ops import triton_kernels as tk

        return tk.lookup(codes, weights, tables, tk.KernelConfig(**config))

    def layer(x, tables, bias, *, tau, weighting, temperature, scale=None):
        if not _trusted(tables):
            codes, w = chunk_hash(x, tau, weighting=weighting, temperature=temperature)
            y = _fallback(codes, w if scale is None else w * row_scales(scale, codes), tables)
            return y if bias is None else y + bias
        from memoryformer.ops import triton_kernels as tk

        return tk.layer_forward(x, tables, bias, tau=tau, weighting=weighting, temperature=temperature, scale=scale,
                                config=tk.KernelConfig(**config))

    register_backend(name, lookup, accepts=lambda t: why_not(t) is None, priority=30,
                     auto=lambda t: t.device.type == "cuda", why_not=why_not, layer_fn=layer if fuse_hash else None,
                     layer_grad=True)


register()
