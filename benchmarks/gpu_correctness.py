"""Part a of the GPU suite (benchmarks/gpu_suite.py): the Triton kernels against the float64 reference and
F.embedding_bag at every Memory Layer shape (in, out, tau) the tiny / small / base presets build, fp32 and bf16
tables, forward and both gradients, N >= 16 384 tokens; torch.library.opcheck of the ops, one test utility at a
time; torch.compile(fullgraph=True) of a block against eager.

Every output the kernels allocate is poisoned first (torch.empty fills with NaN under deterministic mode), so an
unwritten tile fails instead of passing on stale memory. Two errors per comparison: max-wise max|err| / max|ref|
and norm-wise ||err||_2 / ||ref||_2; both must be within TOL."""

from __future__ import annotations

import contextlib
import time

import torch
from gpu_common import Suite, block, free, grads

from memoryformer import MemoryLayer, build_model, get_config
from memoryformer.model import MemoryFormerBlock
from memoryformer.ops import chunk_hash, lookup_embedding_bag, lookup_reference, triton_backend

# fp32: fp32 accumulation of K <= 160 terms (~K * 6e-8 worst case); bf16: outputs and gradients are rounded to
# 8 significant bits (unit roundoff 2**-8 = 3.9e-3 per element, about half that norm-wise).
TOL = {"float32": dict(max=2e-5, norm=5e-6), "bfloat16": dict(max=1.5e-2, norm=5e-3)}


def layer_shapes(presets, over: dict) -> list[dict]:
    """Every distinct Memory Layer (in, out, tau) of the presets, read off the models the code builds (on the meta
    device: no memory), with the first preset and module path that uses it."""
    seen = {}
    for name in presets:
        with torch.device("meta"):
            model = build_model(get_config(name, **over))
        for path, m in model.named_modules():
            if isinstance(m, MemoryLayer):
                key = (m.in_features, m.out_features, m.tau)
                seen.setdefault(key, dict(preset=name, layer=path.split(".", 2)[-1], d_in=key[0], d_out=key[1],
                                          tau=key[2], weighting=m.weighting))
    return list(seen.values())


@contextlib.contextmanager
def poisoned():
    """torch.empty fills floats with NaN (integers with their maximum) while the kernels run."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    g = got.double()
    bad = int((~torch.isfinite(g)).sum())
    if bad:
        return dict(max=float("inf"), norm=float("inf"), nonfinite=bad)
    d = g - want
    return dict(max=(d.abs().max() / want.abs().max().clamp_min(1e-30)).item(),
                norm=(d.norm() / want.norm().clamp_min(1e-30)).item(), nonfinite=0)


def _reference(x, T, gy, tau: int, weighting: str, chunk: int) -> dict:
    """Float64 y, dL/dx (layer), dL/dw (lookup), dL/dT for L = <gy, y>, through chunk_hash + lookup_reference,
    in token chunks (the reference holds (tokens, K, h) rows)."""
    T64 = T.double().requires_grad_()
    ys, gxs, gws, gt = [], [], [], torch.zeros_like(T64)
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk].double().requires_grad_()
        codes, w = chunk_hash(xs, tau, weighting=weighting)
        wl = w.detach().requires_grad_()
        y = lookup_reference(codes, wl, T64)
        gw, gtc = torch.autograd.grad(y, [wl, T64], gy[i:i + chunk].double())
        gxs.append(torch.autograd.grad(w, [xs], gw)[0])
        ys.append(y.detach())
        gws.append(gw)
        gt += gtc
        del y, gtc
    return dict(y=torch.cat(ys), gx=torch.cat(gxs), gw=torch.cat(gws), gt=gt)


def check_case(s: Suite, dtype: torch.dtype, shape: dict, weighting: str) -> dict:
    """One layer shape and table dtype at N tokens: fused layer, lookup op, atomic table gradient."""
    from memoryformer.ops import triton_kernels as tk

    d_in, d_out, tau, n, dev = shape["d_in"], shape["d_out"], shape["tau"], s.size["n"], s.dev
    K = d_in // tau
    g = torch.Generator(device=dev).manual_seed(d_in * 7 + d_out)
    x = torch.randn(n, d_in, device=dev, generator=g).to(dtype)
    T = (0.02 * torch.randn(K, 2**tau, d_out, device=dev, generator=g)).to(dtype)
    gy = torch.randn(n, d_out, device=dev, generator=g).to(dtype)
    ref = _reference(x, T, gy, tau, weighting, max(1, s.size["ref_elems"] // (K * d_out)))
    codes, w = chunk_hash(x.double(), tau, weighting=weighting)
    w = w.float()
    with poisoned():  # the kernels themselves, not the backend (which would fall back if its self-check failed)
        lay = grads(lambda x_, T_: tk.layer_forward(x_, T_, None, tau=tau, weighting=weighting, temperature=1.0),
                    x, T, gy)
        lk = grads(lambda w_, T_: tk.lookup(codes, w_, T_), w, T, gy)
        _, atomic = tk.backward(gy.contiguous(), codes, w, T, False, True, tk.KernelConfig(table_grad="atomic"))
    bag = grads(lambda w_, T_: lookup_embedding_bag(codes, w_, T_), w, T.float(), gy.float())
    errs = dict(layer_y=compare(lay[0], ref["y"]), layer_grad_x=compare(lay[1], ref["gx"]),
                layer_grad_tables=compare(lay[2], ref["gt"]), lookup_y=compare(lk[0], ref["y"]),
                lookup_grad_weights=compare(lk[1], ref["gw"]), lookup_grad_tables=compare(lk[2], ref["gt"]),
                atomic_grad_tables=compare(atomic, ref["gt"]), vs_embedding_bag_y=compare(lk[0], bag[0].double()),
                vs_embedding_bag_grad_weights=compare(lk[1], bag[1].double()),
                vs_embedding_bag_grad_tables=compare(lk[2], bag[2].double()))
    name = str(dtype).removeprefix("torch.")
    tol = TOL[name]
    worst_max, worst_norm = max(e["max"] for e in errs.values()), max(e["norm"] for e in errs.values())
    nonfinite = sum(e["nonfinite"] for e in errs.values())
    return dict(errors=errs, worst_max=worst_max, worst_norm=worst_norm, nonfinite=nonfinite, tol=tol,
                ok=nonfinite == 0 and worst_max <= tol["max"] and worst_norm <= tol["norm"])


def opcheck(s: Suite) -> dict:
    """torch.library.opcheck of every Triton op, each test utility on its own (one failure hides no other)."""
    from memoryformer.ops import triton_kernels  # noqa: F401  (registers the ops)

    g, dev, f64 = torch.Generator().manual_seed(2), s.dev, torch.float64
    N, K, R, h, tau = 6, 2, 8, 6, 3
    codes = torch.randint(0, R, (N, K), generator=g).to(dev)
    w = torch.rand(N, K, generator=g, dtype=f64).to(dev).requires_grad_()
    T = torch.randn(K, R, h, generator=g, dtype=f64).to(dev).requires_grad_()
    x = torch.randn(N, K * tau, generator=g, dtype=f64).to(dev).requires_grad_()
    gy = torch.randn(N, h, generator=g, dtype=f64).to(dev)
    # The interpreter cannot launch kernels on the fake tensors AOT dispatch traces with; compiled Triton can.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    utils += ("test_aot_dispatch_dynamic",) if dev.type == "cuda" else ()
    ops = torch.ops.memoryformer
    calls = dict(lookup_triton=(codes, w, T), lookup_triton_backward=(gy, codes, w.detach(), T.detach(), True, True),
                 layer_triton=(x, T, tau, True, 1.0),
                 layer_triton_input_grad=(gy, x.detach(), codes.int(), T.detach(), tau, False, 0.7))
    out = {}
    for name, args in calls.items():
        out[name] = {}
        for util in utils:
            try:
                torch.library.opcheck(getattr(ops, name).default, args, test_utils=(util,))
                out[name][util] = "ok"
            except Exception as e:
                out[name][util] = f"{type(e).__name__}: {e}"[:1500]
                if s.dev.type == "cuda" and torch.cuda.is_available():
                    torch.cuda.synchronize()  # a poisoned context raises here, and the part stops
    return out


def compile_check(s: Suite) -> dict:
    """A MemoryFormer block under torch.compile(fullgraph=True) against eager, fp32, forward + backward. A hash
    code may flip where fused rounding moves an input across 0, so the check counts elements off by > 1e-3."""
    B, T, backend = s.size["compile"]
    torch._dynamo.reset()
    cfg = get_config("tiny", **{**s.size["over"], "max_seq_len": T})
    torch.manual_seed(0)
    blk = block(cfg, MemoryFormerBlock, s.dev)
    x = torch.randn(B, T, cfg.d_model, device=s.dev)
    gy = torch.randn_like(x)
    tables = [m.tables for m in blk.modules() if isinstance(m, MemoryLayer)]

    def run(f):
        xg = x.clone().requires_grad_()
        y = f(xg)
        return [y.detach(), *torch.autograd.grad(y, [xg, *tables], gy)]

    eager = run(blk)
    t = time.monotonic()
    comp = run(torch.compile(blk, fullgraph=True, backend=backend))
    names = ["y", "grad_x"] + [f"grad_tables_{i}" for i in range(len(tables))]
    errs = {k: compare(c, e.double()) for k, c, e in zip(names, comp, eager)}
    frac = {k: ((c - e).abs() > 1e-3 * e.abs().max()).float().mean().item() for k, c, e in zip(names, comp, eager)}
    return dict(backend=backend, shape=[B, T, cfg.d_model], compile_and_run_s=time.monotonic() - t,
                errors=errs, mismatch_fraction=frac, ok=max(frac.values()) <= 1e-2)


def part_correctness(s: Suite, res: dict) -> None:
    est, first = s.size["est"], True
    res["self_check"] = {}  # what the backend decides on first use; a failure sends every layer to embedding_bag
    for dtype in (torch.float32, torch.bfloat16):
        if s.fits(est["self_check"], f"a self-check {str(dtype)[6:]}", "a"):
            verdict = triton_backend.self_check(s.dev, dtype)
            res["self_check"][str(dtype)[6:]] = "ok" if verdict is None else verdict
            s.log(f"self-check {str(dtype)[6:]}: {res['self_check'][str(dtype)[6:]]}")
    s.save()
    res["shapes"] = layer_shapes(s.size["presets"], s.size["over"])
    res["cases"] = []
    for shape in res["shapes"]:
        weightings = [shape["weighting"]] + (["release" if shape["weighting"] == "paper" else "paper"] * first)
        first = False
        for dtype in (torch.float32, torch.bfloat16):
            for weighting in weightings:
                what = (f"{shape['preset']} {shape['layer']} {shape['d_in']}->{shape['d_out']} tau={shape['tau']} "
                        f"{weighting}")
                if not s.fits(est["case"], f"a {str(dtype)[6:]} {what}", "a"):
                    continue
                case = {**shape, "dtype": str(dtype)[6:], "what": what, "n": s.size["n"], "weighting": weighting}
                res["cases"].append(case)
                s.attempt(case, lambda: check_case(s, dtype, shape, weighting))
                case.setdefault("ok", False)
                s.log(f"a {case['dtype']} {what}: " + (f"max-wise {case['worst_max']:.2e}, norm-wise "
                      f"{case['worst_norm']:.2e} {'ok' if case['ok'] else 'FAIL'}" if "errors" in case else "error"))
                free()
                s.save()
                if s.poisoned():
                    return
    res["opcheck"] = {}
    if s.fits(est["opcheck"], "a opcheck", "a") and s.attempt(res["opcheck"], lambda: opcheck(s)):
        s.log(f"opcheck: {sum(v == 'ok' for u in res['opcheck'].values() for v in u.values())} checks ok")
    s.save()
    if not s.poisoned() and s.fits(est["compile"], "a torch.compile of a block", "a"):
        res["compile"] = {}
        s.attempt(res["compile"], lambda: compile_check(s))
    checks = [v for u in res["opcheck"].values() if isinstance(u, dict) for v in u.values()]
    res["all_ok"] = (bool(res["cases"]) and all(c["ok"] for c in res["cases"]) and bool(checks)
                     and list(res["self_check"].values()) == ["ok", "ok"]
                     and all(v == "ok" for v in checks) and res.get("compile", {}).get("ok", False))
