"""Checks of the Triton backend against the float64 reference, shared by the interpreter run (CPU tensors under
TRITON_INTERPRET=1, in a subprocess started by test_ops_triton.py) and the CUDA run. Tiny shapes: the interpreter
executes every program in Python.

Run directly: `TRITON_INTERPRET=1 python tests/triton_cases.py` prints one JSON line {case: "ok" | traceback}.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

from memoryformer import MemoryLayer
from memoryformer.ops import lookup_reference, memory_lookup, quantize_rows

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _close(got, want, dtype, what):
    got, want = got.double(), want.double()
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]} ({dtype})"


def _check_lookup(device, dtype, mode, **kw):
    _check_lookup_now(device, dtype, table_grad=mode, **kw)


def _lookup(codes, w, T, table_grad="sorted", config=None):
    """The registered op (default kernels) or, for another table gradient or tiles, the configured eager path."""
    from memoryformer.ops import triton_kernels as tk

    config = config or tk.KernelConfig(table_grad=table_grad)
    if config == tk.DEFAULT:
        return memory_lookup(codes, w, T, backend="triton")
    return tk.lookup(codes, w, T, config)


def _check_lookup_now(device, dtype, N=37, K=3, R=16, h=40, lead=None, code_dtype=torch.int64, table_grad="sorted",
                      config=None):
    g = torch.Generator().manual_seed(N * 7 + K)
    shape = lead or (N,)
    codes = torch.randint(0, R, (*shape, K), generator=g).to(code_dtype).to(device)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(*shape, K, generator=g, dtype=wdt).to(device).requires_grad_()
    T = torch.randn(K, R, h, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    y = _lookup(codes, w, T, table_grad, config)
    assert y.dtype == dtype and y.shape == (*shape, h)
    ref = lookup_reference(codes.long(), w.double(), T.double())
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    gw, gt = torch.autograd.grad(y, [w, T], gy.to(dtype))
    rw, rt = torch.autograd.grad(ref, [w, T], gy)
    _close(y, ref, dtype, "output")
    _close(gw, rw, dtype, "grad weights")
    _close(gt, rt, dtype, "grad tables")
    assert gw.dtype == w.dtype and gt.dtype == T.dtype


def case_float64_sorted(device):
    _check_lookup(device, torch.float64, "sorted")


def case_float64_atomic(device):
    _check_lookup(device, torch.float64, "atomic")


def case_float32_sorted(device):
    _check_lookup(device, torch.float32, "sorted")


def case_bfloat16_sorted(device):
    _check_lookup(device, torch.bfloat16, "sorted")


def case_float16_atomic(device):
    _check_lookup(device, torch.float16, "atomic")


def case_leading_dims_int32_codes(device):
    _check_lookup(device, torch.float64, "sorted", K=4, R=8, h=33, lead=(2, 5), code_dtype=torch.int32)


def case_several_output_tiles(device):
    # h = 150: three 64-wide forward tiles and two 128-wide backward tiles, each with a masked tail
    _check_lookup(device, torch.float64, "sorted", N=40, K=2, R=4, h=150)


def case_fused_layer_several_output_tiles(device):
    torch.manual_seed(1)
    ref = MemoryLayer(8, 150, tau=4, backend="reference", dtype=torch.float64).to(device)
    tri = MemoryLayer(8, 150, tau=4, backend="triton", dtype=torch.float64).to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(40, 8, dtype=torch.float64, device=device, requires_grad=True)
    ys = [m(x) for m in (ref, tri)]
    gs = [torch.autograd.grad(y.square().sum(), [x, m.tables]) for y, m in zip(ys, (ref, tri))]
    _close(ys[1], ys[0], torch.float64, "output")
    for a, b in zip(gs[1], gs[0]):
        _close(a, b, torch.float64, "grads")


def case_single_table_narrow(device):
    _check_lookup(device, torch.float64, "sorted", N=3, K=1, R=2, h=1)


def case_empty_batch(device):
    codes = torch.zeros(0, 2, dtype=torch.int64, device=device)
    w = torch.zeros(0, 2, device=device, requires_grad=True)
    T = torch.randn(2, 4, 8, device=device, requires_grad=True)
    y = memory_lookup(codes, w, T, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 8) and T.grad.abs().sum() == 0


def case_int8_tables(device):
    g = torch.Generator().manual_seed(3)
    T = torch.randn(3, 16, 24, generator=g, dtype=torch.float64)
    q, scale = quantize_rows(T)
    codes = torch.randint(0, 16, (9, 3), generator=g)
    w = torch.rand(9, 3, generator=g)
    y = memory_lookup(codes.to(device), w.to(device), q.to(device), backend="triton", scale=scale.to(device))
    want = lookup_reference(codes, w.double(), q.double() * scale.double()[..., None])
    assert y.dtype == torch.float32
    _close(y.cpu(), want, torch.float32, "int8 output")


def case_sorted_is_deterministic(device):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 4, (50, 2), generator=g).to(device)  # many tokens per row
    w = torch.rand(50, 2, generator=g).to(device)
    T = torch.randn(2, 4, 16, generator=g).to(device).requires_grad_()
    grads = []
    for _ in range(2):
        y = memory_lookup(codes, w, T, backend="triton")
        (gt,) = torch.autograd.grad(y, [T], torch.ones_like(y))
        grads.append(gt)
    assert torch.equal(grads[0], grads[1])


def case_memory_layer_input_grad(device):
    torch.manual_seed(0)
    ref = MemoryLayer(16, 12, tau=4, backend="reference", dtype=torch.float64).to(device)
    tri = MemoryLayer(16, 12, tau=4, backend="triton", dtype=torch.float64).to(device)
    tri.load_state_dict(ref.state_dict())
    assert tri.active_backend() == "triton"
    x = torch.randn(2, 3, 16, dtype=torch.float64, device=device, requires_grad=True)
    ys = [m(x) for m in (ref, tri)]
    gs = [torch.autograd.grad(y.square().sum(), [x, m.tables, m.bias]) for y, m in zip(ys, (ref, tri))]
    _close(ys[1], ys[0], torch.float64, "layer output")
    for a, b in zip(gs[1], gs[0]):
        _close(a, b, torch.float64, "layer grads")


def _check_fused_layer(device, tau, weighting, temperature, dtype=torch.float64, lead=(2, 5)):
    torch.manual_seed(tau)
    kw = dict(weighting=weighting, temperature=temperature, dtype=torch.float64)
    ref = MemoryLayer(4 * tau, 24, tau=tau, backend="reference", **kw).to(device)
    tri = MemoryLayer(4 * tau, 24, tau=tau, backend="triton", **kw).to(device=device, dtype=dtype)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(*lead, 4 * tau, dtype=torch.float64, device=device)
    x[0, 0, :2] = 0.0  # sign(0) = +1, d|z|/dz = 0 at 0, as chunk_hash
    x = x.requires_grad_()
    y_ref = ref(x)
    xt = x.detach().to(dtype).requires_grad_()
    y = tri(xt)
    assert y.dtype == dtype
    g = torch.randn_like(y_ref)
    want = torch.autograd.grad(y_ref, [x, ref.tables, ref.bias], g)
    got = torch.autograd.grad(y, [xt, tri.tables, tri.bias], g.to(dtype))
    _close(y, y_ref, dtype, "fused layer output")
    for a, b, what in zip(got, want, ("x", "tables", "bias")):
        _close(a, b, dtype, f"fused layer grad {what}")


def case_fused_layer_release_tau4(device):
    _check_fused_layer(device, 4, "release", 1.0)


def case_fused_layer_paper_tau3_temperature(device):
    _check_fused_layer(device, 3, "paper", 0.5)  # tau not a power of two: masked lanes


def case_fused_layer_float32(device):
    _check_fused_layer(device, 4, "release", 1.0, dtype=torch.float32)


def case_fused_layer_gradcheck(device):
    """Finite differences of the hash weights (Eq. 10, with and without the L1 factor) through the fused kernels."""
    from memoryformer.ops import triton_kernels

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    T = torch.randn(2, 8, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    for weighting in ("release", "paper"):
        def f(x, T):
            return triton_kernels.layer_forward(x, T, None, tau=3, weighting=weighting, temperature=0.7)

        assert torch.autograd.gradcheck(f, (x, T), fast_mode=True)


def case_opcheck(device):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 8, (5, 2), generator=g).to(device)
    w = torch.rand(5, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    T = torch.randn(2, 8, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    from memoryformer.ops import triton_kernels

    # The interpreter cannot run kernels on the fake tensors AOT dispatch traces with; compiled Triton can.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if device == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(triton_kernels.lookup_op, (codes, w, T), test_utils=utils)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    torch.library.opcheck(triton_kernels.layer_op, (x, T[:, :, :], 3, True, 1.0), test_utils=utils)


def case_gradcheck(device):
    from memoryformer.ops import triton_kernels

    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 4, (4, 2), generator=g).to(device)
    w = torch.rand(4, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    T = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(triton_kernels.lookup_op, (codes, w, T), fast_mode=True)


def case_hash_codes_exact(device):
    """The fused kernel's codes are chunk_hash's, bit for bit, at every tau the presets use (8; 10 in the Memory
    Block's second layer) and at the extremes: bit weights are integer shifts, not float powers of two."""
    from memoryformer.ops import chunk_hash, triton_kernels

    g = torch.Generator().manual_seed(7)
    for tau in (1, 3, 8, 10, 16):
        x = torch.randn(70, 2 * tau, generator=g)
        x[0] = 0.0  # sign(0) = +1
        x[1] = -1.0  # the all-zeros code
        x[2] = 1.0  # the all-ones code, 2**tau - 1
        T = torch.zeros(2, 2**tau, 1)
        _, codes, w = triton_kernels.layer_op(x.to(device), T.to(device), tau, False, 1.0)
        want, want_w = chunk_hash(x.double(), tau, weighting="paper")
        assert torch.equal(codes.cpu().long(), want), f"tau={tau}: codes differ from chunk_hash"
        assert int(codes[2, 0]) == 2**tau - 1 and int(codes[1, 0]) == 0
        _close(w.cpu(), want_w, torch.float32, f"tau={tau} weights")


def case_outputs_poisoned_before_the_kernels(device):
    """Every output element is written: torch.empty fills with NaN under deterministic mode, so an unwritten tile
    (or partial-sum slot) shows up as NaN instead of passing on whatever the allocator left there."""
    from memoryformer.ops import triton_kernels

    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4, device=device)).all()  # the poisoning is on
        for tau, h in ((4, 150), (3, 1)):
            _check_fused_layer(device, tau, "release", 1.0, lead=(3, 23))
            _check_lookup_now(device, torch.float32, N=45, K=2, R=8, h=h)
            _check_lookup_now(device, torch.float32, N=45, K=2, R=8, h=h, table_grad="atomic")
        x = torch.randn(33, 12, device=device, requires_grad=True)
        T = torch.randn(3, 16, 70, device=device, requires_grad=True)
        y = triton_kernels.layer_forward(x, T, None, tau=4, weighting="paper", temperature=1.0)
        gx, gt = torch.autograd.grad(y, [x, T], torch.ones_like(y))
        assert all(bool(torch.isfinite(t).all()) for t in (y, gx, gt))
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


def case_configured_kernels(device):
    """Non-default tiles and the atomic scatter through the eager path, lookup and fused layer."""
    from memoryformer.ops import triton_kernels as tk

    cfg = tk.KernelConfig(fwd=(16, 32), bwd=(16, 64), seg=(8, 32), table_grad="atomic")
    _check_lookup_now(device, torch.float64, N=40, K=2, R=4, h=70, config=cfg)
    _check_lookup_now(device, torch.float64, N=40, K=2, R=4, h=70, config=cfg._replace(table_grad="sorted"))
    torch.manual_seed(2)
    ref = MemoryLayer(8, 70, tau=4, backend="reference", dtype=torch.float64).to(device)
    x = torch.randn(41, 8, dtype=torch.float64, device=device, requires_grad=True)
    T = ref.tables.detach().clone().requires_grad_()
    y = tk.layer_forward(x, T, ref.bias, tau=4, weighting=ref.weighting, temperature=1.0, config=cfg)
    y_ref = ref(x)
    gy = torch.randn_like(y)
    got, want = torch.autograd.grad(y, [x, T], gy), torch.autograd.grad(y_ref, [x, ref.tables], gy)
    _close(y, y_ref, torch.float64, "configured layer output")
    for a, b in zip(got, want):
        _close(a, b, torch.float64, "configured layer grads")
    try:
        tk.backward(gy, torch.zeros(41, 2, dtype=torch.long, device=device), x[:, :2], T, False, True,
                    cfg._replace(table_grad="scatter"))
    except ValueError as e:
        assert "table_grad" in str(e)
    else:
        raise AssertionError("an unknown table_grad was accepted")


CASES = {name: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


def run_all(device: str) -> dict[str, str]:
    out = {}
    for name, fn in CASES.items():
        try:
            fn(device)
            out[name] = "ok"
        except Exception:  # report every case, not just the first failure
            out[name] = traceback.format_exc()
    return out


if __name__ == "__main__":
    print(json.dumps(run_all(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
