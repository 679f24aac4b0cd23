"""The reference equations against each other (Eq. 9 against its closed form Eq. 10, Eq. 12 against autograd), and
every CPU backend's hash against the reference hash: the same codes exactly, the same weights up to rounding; every
backend's layer forward and both gradients against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from memoryformer import MemoryLayer
from memoryformer.ops import cpu, cpu_ext, memory_hash, memory_layer
from memoryformer.ops import reference as ref

CPU_BACKENDS = ["reference", "embedding_bag", "cpu"]


def _inputs(N, K, tau, dtype=torch.float64, seed=0):
    x = torch.randn(N, K * tau, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0, :tau] = 0.0  # sign(0) = +1 (Eq. 3)
    x[1, 0] = -0.0  # -0.0 >= 0 too
    x[2, 1] = 1e-30  # tiny magnitudes keep their sign
    x[2, 2] = -1e-30
    return x.to(dtype)


def test_eq3_to_eq5_figure2_and_sign_of_zero():
    z = torch.tensor([[0.7, -0.1], [-0.5, 0.2], [0.4, -0.6]])  # Fig. 2: buckets 2, 1, 2
    assert ref.hash_codes(z).tolist() == [2, 1, 2]
    assert ref.sign(torch.tensor([0.0, -0.0, -2.0, 3.0])).tolist() == [1.0, 1.0, -1.0, 1.0]
    bits = torch.tensor([[True, False, False, True]])
    assert ref.pack_bits(bits).tolist() == [int("1001", 2)]  # element 0 is the most significant bit


@pytest.mark.parametrize("tau", [1, 2, 5])
@pytest.mark.parametrize("t", [1.0, 0.3])
def test_eq9_softmax_over_all_buckets_is_eq10(tau, t):
    z = _inputs(7, 3, tau).unflatten(-1, (3, tau))
    torch.testing.assert_close(ref.bucket_probability(z, t), ref.p(z, t), rtol=1e-12, atol=0)
    assert bool(((ref.p(z, t) >= 2.0**-tau) & (ref.p(z, t) < 1)).all())


def test_eq8_similarity_is_the_l1_norm_and_release_weighting():
    z = _inputs(5, 2, 4).unflatten(-1, (2, 4))
    torch.testing.assert_close(ref.similarity(z), z.abs().sum(-1), rtol=0, atol=0)
    torch.testing.assert_close(ref.chunk_weights(z, "release", 0.5), z.abs().sum(-1) * ref.p(z, 0.5))


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_eq12_input_gradient_closed_form(t):
    z = _inputs(6, 2, 4).unflatten(-1, (2, 4)).requires_grad_()
    (auto,) = torch.autograd.grad(ref.p(z, t).sum(), [z])
    torch.testing.assert_close(ref.p_grad(z.detach(), t), auto, rtol=1e-12, atol=1e-15)


def test_eq12_lookup_gradients_are_autograd_of_eq11():
    g = torch.Generator().manual_seed(3)
    K, R, h = 3, 8, 5
    codes = torch.randint(0, R, (4, 6, K), generator=g)
    w = torch.rand(4, 6, K, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.randn(K, R, h, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, 6, h, generator=g, dtype=torch.float64)
    auto = torch.autograd.grad(ref.lookup_reference(codes, w, T), [w, T], gy)
    explicit = ref.lookup_grads(gy, codes, w.detach(), T.detach())
    for a, b in zip(explicit, auto):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [1, 3, 8, 10, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighting", ["paper", "release"])
def test_cpu_hash_equals_reference_hash(tau, dtype, weighting):
    x = _inputs(300 if tau < 16 else 40, 4, tau, dtype)
    for xs in (x, x.t().contiguous().t()):  # contiguous and strided inputs
        codes, w = cpu.chunk_hash(xs, tau, weighting=weighting, temperature=0.8)
        want_codes, want_w = ref.chunk_hash(xs, tau, weighting=weighting, temperature=0.8)
        assert codes.dtype == torch.int64 and torch.equal(codes, want_codes)
        assert w.dtype == want_w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        exact = ref.chunk_hash(xs.double(), tau, weighting=weighting, temperature=0.8)[1]
        torch.testing.assert_close(w.double(), exact, rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0)


@pytest.mark.parametrize("tau", [4, 8, 10])
def test_compiled_kernel_hash_codes_equal_reference(tau):
    """The compiled 1-2 token kernel hashes inside the layer: with one-hot rows (row r of table k puts a 1 at
    column k*R + r) its output shows the code it picked for each chunk."""
    if cpu_ext.get() is None:
        pytest.skip(f"compiled CPU kernels unavailable: {cpu_ext.why_not()}")
    K, R = 3, 2**tau
    tables = torch.eye(K * R).view(K, R, K * R)
    for seed in range(4):
        x = _inputs(3, K, tau, torch.float32, seed)[seed % 2 : seed % 2 + 2]  # 2 tokens, with zeros and -0.0
        with torch.no_grad():
            y = memory_layer(x, tables, None, tau=tau, backend="cpu")
        codes = y.view(2, K, R).argmax(-1)
        assert torch.equal(codes, ref.chunk_hash(x, tau)[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weighting", ["paper", "release"])
def test_layer_forward_and_gradients_against_float64_reference(backend, weighting):
    """float32 layer through each backend against Eq. 10-12 evaluated in float64 by the explicit formulas."""
    tau, K, h, t = 4, 3, 6, 0.7
    layer = MemoryLayer(K * tau, h, tau=tau, weighting=weighting, temperature=t, backend=backend)
    x = _inputs(9, K, tau, torch.float32, seed=5).requires_grad_()
    y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    gx, gt, gb = torch.autograd.grad(y, [x, layer.tables, layer.bias], gy)
    z = ref.chunks(x.detach().double(), tau)
    T, b, g = layer.tables.detach().double(), layer.bias.detach().double(), gy.double()
    codes, w = ref.hash_codes(z), ref.chunk_weights(z, weighting, t)
    torch.testing.assert_close(y.double(), ref.lookup_reference(codes, w, T) + b, rtol=1e-5, atol=1e-6)
    gw, want_gt = ref.lookup_grads(g, codes, w, T)
    dw = ref.p_grad(z, t)  # dw/dz for "paper"; "release" adds the product rule with sim = ||z||_1
    if weighting == "release":
        dw = dw * ref.similarity(z)[..., None] + ref.p(z, t)[..., None] * torch.sgn(z)
    want_gx = (gw[..., None] * dw).flatten(-2)
    torch.testing.assert_close(gt.double(), want_gt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double(), g.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), want_gx, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_layer_every_backend(backend):
    layer = MemoryLayer(8, 3, tau=4, weighting="release", backend=backend, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert x.abs().min() > 1e-3  # no sign flips under gradcheck's perturbations: the codes stay constant (Eq. 12)
    x.requires_grad_()
    tables = layer.tables.detach().clone().requires_grad_()

    def f(x, tables):
        return memory_layer(x, tables, layer.bias, tau=4, weighting="release", backend=backend)

    assert torch.autograd.gradcheck(f, (x, tables), eps=1e-6, atol=1e-7)


def test_layer_hash_is_its_backends_hash():
    x = _inputs(5, 2, 8, torch.float32)
    for backend, fn in (("cpu", cpu.chunk_hash), ("reference", ref.chunk_hash), ("embedding_bag", ref.chunk_hash)):
        layer = MemoryLayer(16, 4, tau=8, backend=backend)
        codes, w = layer.hash(x)
        want = fn(x, 8, weighting=layer.weighting, temperature=layer.temperature)
        assert torch.equal(codes, want[0]) and torch.equal(w, want[1])
        assert all(torch.equal(a, b) for a, b in zip(memory_hash(x, layer.tables, tau=8, backend=backend), want))
