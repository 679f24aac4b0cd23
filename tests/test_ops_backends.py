"""CPU backends of the Memory Layer op against the float64 reference; the custom op's registrations; sparse table
gradients; int8/bf16 inference tables and their packed rows; how "auto" chooses."""

from __future__ import annotations

import logging

import pytest
import torch

import memoryformer.ops as ops
from memoryformer import MemoryLayer
from memoryformer.ops import cpu, lookup_reference, memory_lookup, quantize_rows, resolve_backend

CPU_BACKENDS = ["reference", "embedding_bag", "cpu"]


def _problem(N=23, K=3, R=16, h=20, dtype=torch.float64, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lead or (N,)
    codes = torch.randint(0, R, (*shape, K), generator=g)
    w = torch.rand(*shape, K, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    T = torch.randn(K, R, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return codes, w, T


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lead", [(23,), (2, 3, 4), (1,)])
def test_matches_reference_float64(backend, lead):
    codes, w, T = _problem(lead=lead)
    bias = torch.randn(T.shape[2], dtype=torch.float64, requires_grad=True)
    y = memory_lookup(codes, w, T, bias, backend=backend)
    ref = lookup_reference(codes, w, T) + bias
    gy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [w, T, bias], gy)
    want = torch.autograd.grad(ref, [w, T, bias], gy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cpu_low_precision(dtype, tol):
    codes, w, T = _problem(N=40, K=8, R=16, h=64, dtype=dtype)
    y = memory_lookup(codes, w, T, backend="cpu")
    assert y.dtype == dtype
    ref = lookup_reference(codes, w.double(), T.double())
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    gw, gt = torch.autograd.grad(y, [w, T], torch.ones_like(y))
    rw, rt = torch.autograd.grad(ref, [w, T], torch.ones_like(ref))
    for a, b in ((gw, rw), (gt, rt)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * b.abs().max().item())


def test_cpu_backward_fallback_chunks_and_int32_codes(monkeypatch):
    def unavailable(*args):
        raise RuntimeError("no such ATen op")

    monkeypatch.setattr(cpu, "_embedding_bag_backward", unavailable)  # the general path
    monkeypatch.setattr(cpu, "_CHUNK_ELEMS", 1)  # one token per step: exercises the chunk loop and its tail
    codes, w, T = _problem(N=7)
    y = memory_lookup(codes.int(), w, T, backend="cpu")
    ref = lookup_reference(codes, w, T)
    for a, b in zip(torch.autograd.grad(y.sum(), [w, T]), torch.autograd.grad(ref.sum(), [w, T])):
        torch.testing.assert_close(a, b)


def test_cpu_backward_is_deterministic():
    codes, w, T = _problem(N=300, K=4, R=4, h=64, dtype=torch.float32)  # ~75 tokens per row
    grads = [torch.autograd.grad(memory_lookup(codes, w, T, backend="cpu").square().sum(), [w, T]) for _ in range(3)]
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_opcheck_cpu_op():
    codes, w, T = _problem(N=6, K=2, R=8, h=5)
    torch.library.opcheck(cpu.lookup_op, (codes, w, T))
    torch.library.opcheck(cpu.lookup_op, (codes, w, T, True))  # sparse_grad
    torch.library.opcheck(cpu.lookup_op, (codes, w.detach().float(), T.detach().float()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sparse_grad_is_the_dense_gradient_on_the_rows_hit(dtype):
    codes, w, T = _problem(N=30, K=3, R=64, h=8, dtype=dtype)
    gy = torch.randn(30, 8, dtype=torch.float64).to(dtype)
    dense = torch.autograd.grad(memory_lookup(codes, w, T, backend="cpu"), [w, T], gy)
    sparse = torch.autograd.grad(memory_lookup(codes, w, T, backend="cpu", sparse_grad=True), [w, T], gy)
    assert sparse[1].is_sparse and sparse[1].dtype == dtype and sparse[1].shape == T.shape
    assert torch.equal(sparse[0], dense[0])
    hit = torch.zeros(T.shape[:2], dtype=torch.bool)
    hit[torch.arange(3), codes] = True
    assert torch.equal(sparse[1].coalesce().indices(), hit.nonzero().T)  # exactly the rows hit
    tol = 0 if dtype != torch.bfloat16 else 1e-2  # dense bf16 gradients are summed in fp32 as well
    torch.testing.assert_close(sparse[1].to_dense(), dense[1], rtol=tol, atol=tol)
    ref = torch.autograd.grad(lookup_reference(codes, w.double(), T.double()), [T], gy.double())[0]
    torch.testing.assert_close(sparse[1].to_dense().double(), ref.double(), rtol=1e-2 if tol else 1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,sparse", [("cpu", True), ("reference", False), ("embedding_bag", False)])
def test_layer_sparse_grad_setting(backend, sparse):
    """`sparse_grad` is the layer's: the backends that offer sparse table gradients give them, the others dense."""
    layer = MemoryLayer(16, 6, tau=4, backend=backend, sparse_grad=True)
    assert "sparse_grad=True" in repr(layer)
    x = torch.randn(7, 16)
    for h in (None, layer.hash(x)):
        layer.tables.grad = None
        layer(x, hash=h).sum().backward()
        assert layer.tables.grad.is_sparse == sparse
    layer.sparse_grad = False
    layer.tables.grad = None
    layer(x).sum().backward()
    assert not layer.tables.grad.is_sparse


def test_gradcheck_through_op_and_layer():
    codes, w, T = _problem(N=4, K=2, R=4, h=3)
    assert torch.autograd.gradcheck(lambda w, T: memory_lookup(codes, w, T, backend="cpu"), (w, T))
    layer = MemoryLayer(8, 3, tau=4, backend="cpu", dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))  # dL/dx through the weights of Eq. 10


@pytest.mark.parametrize("weighting,temperature", [("release", 1.0), ("paper", 0.5)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("tau,tokens", [(4, 10), (8, 70), (10, 3)])
def test_fused_inference_layer_matches_reference(weighting, temperature, table_dtype, tau, tokens):
    torch.manual_seed(tau)
    layer = MemoryLayer(4 * tau, 24, tau=tau, weighting=weighting, temperature=temperature, backend="cpu")
    ref_layer = MemoryLayer(4 * tau, 24, tau=tau, weighting=weighting, temperature=temperature, backend="reference")
    ref_layer.load_state_dict(layer.state_dict())
    if table_dtype != torch.float32:
        for m in (layer, ref_layer):
            m.freeze(table_dtype)
    x = torch.randn(tokens, 4 * tau)
    x[0, :3] = 0.0  # sign(0) = +1
    with torch.no_grad():
        fused = layer(x)
        unfused = layer(x, hash=layer.hash(x))
        ref = ref_layer(x)
    tol = 1e-5 if table_dtype != torch.bfloat16 else 2e-2  # bf16: embedding_bag rounds weights and output to bf16
    assert fused.dtype == torch.float32
    assert torch.equal(fused, unfused)  # one hash on this backend, and the same sums
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol)


def test_int8_tables_packed_once_per_tables():
    torch.manual_seed(0)
    layer = MemoryLayer(32, 24, tau=8, backend="cpu").freeze("int8")
    x = torch.randn(9, 32)
    assert layer.packed_tables is None
    with torch.no_grad():
        y = layer(x)
        packed = layer.packed_tables
        assert packed is not None and torch.equal(packed, cpu.pack_int8(layer.tables))
        assert [n for n, _ in layer.named_buffers()] == ["scale"]  # not saved, moved or broadcast
        layer(x)
        assert layer.packed_tables is packed  # kept while the tables stay the same
        unpacked = ops.memory_layer(x, layer.tables, layer.bias, tau=8, backend="cpu", scale=layer.scale)
        assert torch.equal(y, unpacked.to(y.dtype))  # packed per call: the same sums
        layer.tables[0, 0, 0] += 1  # in place: packed again
        layer(x)
        assert layer.packed_tables is not packed and torch.equal(layer.packed_tables, cpu.pack_int8(layer.tables))
    rows = layer.tables.reshape(-1, 24).to(torch.int16) + 128
    assert torch.equal(layer.packed_tables[:, :24].to(torch.int16), rows)  # q + 128 as uint8
    assert torch.equal(layer.packed_tables[:, 24:].view(torch.float32)[0], torch.tensor([1.0, -128.0]))


@pytest.mark.parametrize("tau", [1, 3, 8, 10, 16])
def test_pack_bits(tau):
    from memoryformer.ops.reference import pack_bits

    bits = torch.rand(300, 7, tau) > 0.5
    want = torch.tensor([[int("".join("1" if b else "0" for b in chunk), 2) for chunk in row] for row in bits.tolist()])
    assert torch.equal(pack_bits(bits), want)
    big = bits.repeat(64, 1, 1)  # above the CPU backend's GEMV threshold
    for fn in (pack_bits, cpu.pack_codes):
        assert torch.equal(fn(bits), want)
        assert torch.equal(fn(bits[:, ::2]), want[:, ::2])  # non-contiguous
        assert torch.equal(fn(bits[:2]), want[:2])
        assert torch.equal(fn(big), want.repeat(64, 1))


def test_quantize_rows_roundtrip():
    T = torch.randn(3, 16, 40)
    T[0, 0] = 0.0  # an all-zero row
    q, scale = quantize_rows(T)
    assert q.dtype == torch.int8 and scale.shape == (3, 16) and q.abs().max() <= 127
    err = (ops.dequantize_rows(q, scale) - T).abs()
    assert (err <= scale[..., None] / 2 + 1e-7).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_int8_lookup_folds_scale(backend):
    codes, w, T = _problem(N=9, K=3, R=16, h=24, dtype=torch.float32)
    q, scale = quantize_rows(T)
    y = memory_lookup(codes, w.detach(), q, backend=backend, scale=scale)
    want = lookup_reference(codes, w.detach().double(), q.double() * scale.double()[..., None])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2e-2), ("int8", 2e-2), ("float16", 2e-3)])
def test_freeze_keeps_outputs(dtype, tol):
    torch.manual_seed(0)
    layer = MemoryLayer(64, 48, tau=8)
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = layer(x)
        layer.freeze(dtype)
        got = layer(x)
    assert got.dtype == torch.float32 and not layer.tables.requires_grad
    assert layer.active_backend() == "cpu"
    assert (got - want).abs().max() <= tol * want.abs().max()
    sd = layer.state_dict()
    assert ("scale" in sd) == (dtype == "int8")
    assert "int8" in repr(layer) or dtype != "int8"


def test_auto_choice_on_cpu():
    layer = MemoryLayer(16, 8, tau=4)
    assert layer.active_backend() == "cpu"
    with torch.no_grad():
        assert layer.active_backend() == "cpu"
    assert layer.freeze("int8").active_backend() == "cpu"
    assert resolve_backend("auto", torch.empty(2, 4, 3, device="meta")).name == "reference"


def test_fallback_notice_once(caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops.dispatch, "_fallback_noted", set())
    monkeypatch.setattr(ops.dispatch, "_resolved", {})
    T = torch.randn(2, 4, 3)
    with caplog.at_level(logging.WARNING, logger="memoryformer"):
        assert resolve_backend("triton", T).name in ("embedding_bag", "cpu")
        resolve_backend("triton", T)
    notes = [r for r in caplog.records if "'triton' kernel unavailable" in r.getMessage()]
    assert len(notes) == 1


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend"):
        MemoryLayer(16, 8, tau=4, backend="fast")
    with pytest.raises(ValueError, match="dtype"):
        MemoryLayer(16, 8, tau=4).freeze("int2")


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_compile_fullgraph_aot_eager(backend):
    """No graph breaks inside the layer: the op has fake and autograd registrations."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MemoryLayer(32, 16, tau=4, backend=backend)
    x = torch.randn(2, 3, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    gx, gt = torch.autograd.grad(y.square().sum(), [x, layer.tables])
    ref = MemoryLayer.forward(layer, x)
    rx, rt = torch.autograd.grad(ref.square().sum(), [x, layer.tables])
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gt, rt)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref)


def test_compile_fullgraph_sparse_grad():
    """sparse_grad under torch.compile: the touched-rows op's fake has a data-dependent row count."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MemoryLayer(32, 16, tau=4, backend="cpu", sparse_grad=True)
    x = torch.randn(2, 3, 32)
    (gt,) = torch.autograd.grad(torch.compile(layer, fullgraph=True, backend="aot_eager")(x).square().sum(),
                                [layer.tables])
    layer.sparse_grad = False
    (want,) = torch.autograd.grad(layer(x).square().sum(), [layer.tables])
    assert gt.is_sparse and torch.equal(gt.to_dense(), want)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MemoryLayer(32, 16, tau=4, backend="cpu")
    x = torch.randn(5, 32, requires_grad=True)
    y = torch.compile(layer, fullgraph=True)(x)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    ref = MemoryLayer.forward(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, torch.autograd.grad(ref.sum(), [x])[0], rtol=1e-5, atol=1e-6)
