"""Memory Layer: hash, weights, gather and gradients against independent float64 computations."""

import math

import pytest
import torch

import memoryformer as mf
from memoryformer.layers import MemoryLayer
from memoryformer.ops import chunk_hash, lookup_embedding_bag, lookup_reference, memory_lookup


def loop_reference(x, tables, bias, tau, weighting, t):
    """y[n] = sum_k w(z_nk) * tables[k, code(z_nk)] + bias, written out with Python loops in float64."""
    x = x.double().reshape(-1, x.shape[-1])
    K = x.shape[1] // tau
    out = torch.zeros(x.shape[0], tables.shape[-1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for k in range(K):
            z = x[n, k * tau : (k + 1) * tau].tolist()
            code = sum((1 if zj >= 0 else 0) << (tau - 1 - j) for j, zj in enumerate(z))
            p = 1.0
            for zj in z:
                p /= 1.0 + math.exp(-2.0 * abs(zj) / t)
            w = p * sum(abs(zj) for zj in z) if weighting == "release" else p
            out[n] += w * tables[k, code].double()
    if bias is not None:
        out += bias.double()
    return out


def test_paper_figure2_example():
    # Fig. 2: tau=2, K=3; z1=[0.7,-0.1] -> bucket 2, z2=[-0.5,0.2] -> bucket 1, z3=[0.4,-0.6] -> bucket 2
    x = torch.tensor([[0.7, -0.1, -0.5, 0.2, 0.4, -0.6]])
    codes, _ = chunk_hash(x, 2)
    assert codes.tolist() == [[2, 1, 2]]


def test_sign_of_zero_is_plus_one_and_msb_first():
    codes, weights = chunk_hash(torch.zeros(1, 8), 4, weighting="release")
    assert codes.tolist() == [[15, 15]]
    assert torch.equal(weights, torch.zeros(1, 2))  # ||0||_1 = 0 under "release" weighting
    _, weights = chunk_hash(torch.zeros(1, 8), 4)  # the default, "paper": p(0) = 2**-tau
    assert torch.equal(weights, torch.full((1, 2), 2.0**-4))
    codes, _ = chunk_hash(torch.tensor([[1.0, -1.0, -1.0, -1.0]]), 4)
    assert codes.tolist() == [[8]]  # the first element is the most significant bit


@pytest.mark.parametrize("weighting", ["paper", "release"])
@pytest.mark.parametrize("t", [1.0, 0.5])
def test_weights_closed_form(weighting, t):
    torch.manual_seed(0)
    x = torch.randn(5, 12, dtype=torch.float64)
    _, w = chunk_hash(x, 4, weighting=weighting, temperature=t)
    z = x.view(5, 3, 4)
    p = 1.0 / torch.prod(1.0 + torch.exp(-2.0 * z.abs() / t), dim=-1)  # Eq. 10
    expected = p * z.abs().sum(-1) if weighting == "release" else p
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
    if weighting == "paper":
        assert ((w >= 2.0**-4) & (w < 1)).all()  # p lies in [2^-tau, 1)


@pytest.mark.parametrize("backend", ["reference", "embedding_bag"])
@pytest.mark.parametrize("weighting", ["paper", "release"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_matches_loop_reference(backend, weighting, dtype):
    torch.manual_seed(1)
    layer = mf.MemoryLayer(12, 7, tau=4, weighting=weighting, temperature=0.7, backend=backend).to(dtype)
    x = torch.randn(2, 3, 12, dtype=dtype)
    y = layer(x)
    assert y.shape == (2, 3, 7) and y.dtype == dtype
    expected = loop_reference(x, layer.tables.detach(), layer.bias.detach(), 4, weighting, 0.7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y.double().reshape(-1, 7), expected, rtol=tol, atol=tol)


def test_backends_agree_on_many_tokens():
    torch.manual_seed(2)
    tables = torch.randn(16, 256, 33)
    codes = torch.randint(0, 256, (4, 50, 16))
    weights = torch.rand(4, 50, 16)
    ref = lookup_reference(codes, weights.double(), tables.double())
    torch.testing.assert_close(lookup_embedding_bag(codes, weights, tables).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "embedding_bag"])
@pytest.mark.parametrize("weighting", ["paper", "release"])
def test_gradcheck_through_weights_and_tables(backend, weighting):
    torch.manual_seed(3)
    layer = mf.MemoryLayer(8, 5, tau=4, weighting=weighting, backend=backend).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    # perturbations of 1e-6 never flip a sign here (|x| is far from 0), so codes stay constant as Eq. 12 assumes
    assert x.abs().min() > 1e-3
    tables = layer.tables.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)

    def f(x, tables, bias):
        codes, w = chunk_hash(x, 4, weighting=weighting)
        return memory_lookup(codes, w, tables, bias, backend=backend)

    assert torch.autograd.gradcheck(f, (x, tables, bias), eps=1e-6, atol=1e-7)


def test_table_gradient_is_sparse_and_weighted():
    torch.manual_seed(4)
    layer = mf.MemoryLayer(8, 3, tau=4)
    x = torch.randn(1, 8)
    codes, w = layer.hash(x)
    g = torch.randn(1, 3)
    layer(x).backward(g)
    grad = layer.tables.grad
    for k in range(2):
        hit = codes[0, k].item()
        torch.testing.assert_close(grad[k, hit], w[0, k] * g[0])
        others = torch.cat([grad[k, :hit], grad[k, hit + 1 :]])
        assert torch.count_nonzero(others) == 0  # rows not hit get no gradient (Eq. 12)


def test_shared_hash_equals_separate_hashing():
    torch.manual_seed(5)
    q, k, v = (mf.MemoryLayer(16, 6, tau=8) for _ in range(3))
    x = torch.randn(4, 16)
    h = v.hash(x)  # hash once, reuse for Q and K
    shared = [layer(x, hash=h) for layer in (q, k, v)]
    separate = [layer(x) for layer in (q, k, v)]
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one fused (K, 2^tau, 3h) table gathered once gives the same three outputs
    fused = mf.MemoryLayer(16, 18, tau=8)
    with torch.no_grad():
        fused.tables.copy_(torch.cat([q.tables, k.tables, v.tables], dim=-1))
        fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    torch.testing.assert_close(fused(x), torch.cat(separate, dim=-1), rtol=1e-6, atol=1e-6)


def test_shapes_parameters_and_leading_dims():
    layer = mf.MemoryLayer(512, 512, tau=8)
    assert layer.tables.shape == (64, 256, 512) and layer.bias.shape == (512,)
    assert mf.MemoryLayer(16, 4, tau=8, bias=False).bias is None
    assert mf.MemoryLayer(16, 4, tau=8)(torch.randn(2, 3, 4, 16)).shape == (2, 3, 4, 4)
    assert mf.MemoryLayer(16, 4, tau=8)(torch.randn(16)).shape == (4,)
    assert mf.MemoryLayer(16, 4, tau=8)(torch.randn(0, 16)).shape == (0, 4)


def test_bad_construction_and_input():
    with pytest.raises(ValueError, match=r"in_features=10.*tau=4"):
        mf.MemoryLayer(10, 4, tau=4)
    with pytest.raises(ValueError, match="weighting"):
        mf.MemoryLayer(8, 4, tau=4, weighting="softmax")
    with pytest.raises(ValueError, match="temperature"):
        mf.MemoryLayer(8, 4, tau=4, temperature=0)
    layer = mf.MemoryLayer(8, 4, tau=4)
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        layer(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\).*\(2, 9\)"):
        layer(torch.ones(2, 9))
    with pytest.raises(ValueError, match="backend"):
        mf.MemoryLayer(8, 4, tau=4, backend="nope")(torch.ones(1, 8))


def test_init_statistics():
    torch.manual_seed(6)
    layer = mf.MemoryLayer(64, 256, tau=8)
    assert abs(layer.tables.std().item() - 0.02) < 1e-3
    assert abs(layer.bias.std().item() - 0.001) < 3e-4


@pytest.mark.parametrize("expand_bits", [0, 1, 2, 3])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_memory_block(expand_bits, activation):
    block = mf.MemoryBlock(32, tau=4, expand_bits=expand_bits, activation=activation)
    assert block.l1.out_features == (4 + expand_bits) * 8
    assert block.l2.tau == 4 + expand_bits and block.l2.n_tables == 8
    assert block.l2.tables.shape == (8, 2 ** (4 + expand_bits), 32)
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = block(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_lsb_bit_order_only_permutes_each_tables_rows():
    """Eq. 4's LSB-first code: the same layer with every table's rows bit-reversed gives the same outputs."""
    torch.manual_seed(0)
    msb = MemoryLayer(24, 5, tau=4, backend="reference").double()
    lsb = MemoryLayer(24, 5, tau=4, bit_order="lsb", backend="reference").double()
    rev = torch.tensor([int(f"{i:04b}"[::-1], 2) for i in range(16)])
    with torch.no_grad():
        lsb.tables.copy_(msb.tables[:, rev])
        lsb.bias.copy_(msb.bias)
    x = torch.randn(7, 24, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(lsb(x), msb(x), rtol=0, atol=1e-12)
    # element 0 of a chunk is the least significant bit: [+, -, -, -] -> row 1 (MSB-first: row 8)
    z = torch.tensor([[1.0, -1, -1, -1] * 6], dtype=torch.float64)
    assert lsb.hash(z)[0].tolist() == [[1] * 6] and msb.hash(z)[0].tolist() == [[8] * 6]
    torch.autograd.gradcheck(lambda t: lsb(t), (x[:3].detach().requires_grad_(),))
    with pytest.raises(ValueError, match="bit_order"):
        MemoryLayer(8, 4, tau=4, bit_order="middle")


def test_hash_projection_hashes_a_learned_linear_of_the_input():
    torch.manual_seed(0)
    layer = MemoryLayer(16, 6, tau=4, hash_projection=True, backend="reference").double()
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    codes, weights = layer.hash(x)
    want = chunk_hash(layer.proj(x), 4)
    assert torch.equal(codes, want[0]) and torch.allclose(weights, want[1])
    layer(x).sum().backward()
    assert layer.proj.weight.grad.abs().sum() > 0  # the projection trains through the weights
    torch.autograd.gradcheck(lambda t: layer(t), (x[:2].detach().requires_grad_(),))
    assert MemoryLayer(16, 6, tau=4).proj is None  # off by default, as in the paper


def test_an_unknown_weighting_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"weighting: expected one of \('release', 'paper'\), got 'code'"):
        mf.MemoryLayer(16, 8, tau=4, weighting="code")
    cfg = mf.get_config("micro")
    (tmp_path / "config.json").write_text(__import__("json").dumps({**cfg.to_dict(), "weighting": "code"}))
    with pytest.raises(mf.ConfigError, match="weighting"):
        mf.ModelConfig.load(tmp_path / "config.json")


def test_float64_input_to_a_float32_layer_is_refused_in_one_line():
    layer = MemoryLayer(16, 8, tau=4)
    with pytest.raises(TypeError, match=r"input: float64, but the layer's tables are float32 \(cast the input"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    assert layer.double()(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64
