"""The compiled CPU kernels: the decode gather and the head GEMV against float64 references for every dtype, threads,
parallel implementation and prefetch setting, huge-page tensors, and the layer's wiring."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import memoryformer as mf
from memoryformer.ops import chunk_hash, cpu_ext, dequantize_rows, lookup_reference, quantize_rows

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def ext():
    cpu_ext.reset()
    module = cpu_ext.get()
    assert module is not None, "the CPU decode kernel failed to build"
    return module


def _reference(x, tables, scale, bias, tau, weighting, t):
    """float64: chunk_hash + plain indexing over the dequantised tables."""
    full = dequantize_rows(tables, scale) if scale is not None else tables
    codes, w = chunk_hash(x.double(), tau, weighting=weighting, temperature=t)
    y = lookup_reference(codes, w, full.double())
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("tau", [4, 8, 10])
def test_decode_matches_float64_reference(ext, dtype, tau):
    torch.manual_seed(tau)
    for weighting, t, n, with_bias in (("release", 1.0, 1, True), ("paper", 0.7, 2, False), ("release", 0.5, 2, True)):
        layer = mf.MemoryLayer(3 * tau, 40, tau=tau, weighting=weighting, temperature=t, bias=with_bias).eval()
        if dtype != "float32":
            layer.freeze(dtype)
        x = torch.randn(n, 3 * tau)
        x[0, 0] = 0.0  # sign(0) = +1
        bias = None if layer.bias is None else layer.bias.detach()
        bias_before = None if bias is None else bias.clone()
        got = ext.decode(x, layer.tables, layer.scale, bias, tau, weighting == "release", t)
        want = _reference(x, layer.tables, layer.scale, bias, tau, weighting, t)
        tol = 1e-5 if dtype in ("float32", "int8") else 1e-6  # tables are exact in every dtype; sums in fp32
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        if bias is not None:
            assert torch.equal(bias, bias_before)  # the output never aliases the bias


def test_layer_uses_the_kernel_for_one_or_two_tokens(ext, monkeypatch):
    layer = mf.MemoryLayer(32, 24, tau=8).eval()
    calls = []
    monkeypatch.setattr(cpu_ext, "get", lambda: (calls.append(1), ext)[1])
    for n in (1, 2, 3):
        x = torch.randn(1, n, 32)
        with torch.no_grad():
            got = layer(x)
            codes, w = chunk_hash(x, 8)
            want = lookup_reference(codes, w, layer.tables) + layer.bias
        assert got.shape == (1, n, 24) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # 1 and 2 tokens; 3 tokens take fbgemm's embedding bag
    x = torch.randn(1, 32, requires_grad=True)
    layer(x).sum().backward()  # training never takes the inference kernel
    assert len(calls) == 2 and x.grad is not None


def test_disabled_by_environment(monkeypatch, caplog):
    monkeypatch.setenv("MEMORYFORMER_CPU_KERNEL", "0")
    cpu_ext.reset()
    try:
        with caplog.at_level("WARNING", logger="memoryformer"):
            assert cpu_ext.get() is None
        assert "MEMORYFORMER_CPU_KERNEL=0" in caplog.text
        layer = mf.MemoryLayer(16, 8, tau=8).eval()
        with torch.no_grad():
            assert layer(torch.randn(16)).shape == (8,)  # the ATen path still runs
    finally:
        cpu_ext.reset()


@pytest.fixture
def parallel_settings(ext):
    """Restores the kernels' thread count, parallel implementation, prefetch distance and torch's threads."""
    before = cpu_ext.threads(), cpu_ext.parallel(), torch.get_num_threads()
    yield
    ext.set_prefetch(8)
    cpu_ext.parallel(before[1])
    cpu_ext.threads(before[0])
    torch.set_num_threads(before[2])


def _variants():
    """(implementation, threads, prefetch): both parallel implementations, one and two threads."""
    return [(impl, th, pf) for impl in ("pool", "aten") for th, pf in ((1, 0), (1, 8), (2, 8), (2, 3))]


def _use(ext, impl, threads, prefetch=8):
    cpu_ext.parallel(impl)
    torch.set_num_threads(threads)  # aten's threads
    cpu_ext.threads(threads)  # the pool's
    ext.set_prefetch(prefetch)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("tau", [8, 10])
def test_threaded_prefetching_gather_matches_float64_reference(ext, parallel_settings, dtype, tau):
    # wide rows (h = 1000: several 64-column chunks per thread and a ragged tail) and K = 13 tables (not a multiple
    # of the 4-row blocks), both parallel implementations, 1 and 2 threads, prefetch on and off: every variant sums
    # the same rows in the same order, so all agree bitwise and with the float64 reference
    torch.manual_seed(tau)
    layer = mf.MemoryLayer(13 * tau, 1000, tau=tau).eval()
    if dtype != "float32":
        layer.freeze(dtype)
    x = torch.randn(2, 13 * tau)
    want = _reference(x, layer.tables, layer.scale, layer.bias.detach(), tau, "release", 1.0)
    first = None
    for impl, threads, prefetch in _variants():
        _use(ext, impl, threads, prefetch)
        assert cpu_ext.parallel() == impl and cpu_ext.threads() == min(threads, os.cpu_count() or 1)
        got = ext.decode(x, layer.tables, layer.scale, layer.bias.detach(), tau, True, 1.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        first = got if first is None else first
        assert torch.equal(got, first), (impl, threads, prefetch)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_engine_is_bitwise_the_same_with_either_parallel_implementation(ext, parallel_settings, dtype):
    from memoryformer.inference import DecodeEngine, random_inference_model

    model = random_inference_model(mf.get_config("micro"), tables=dtype, head=dtype, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    outs = []
    for impl, threads, _ in _variants()[::2]:
        _use(ext, impl, threads)
        eng = DecodeEngine(model, batch_size=2, max_seq_len=16)
        lg = [eng.prefill(ids)]
        for _ in range(3):
            lg.append(eng.step(lg[-1].argmax(-1)))
        outs.append(torch.stack(lg))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_parallel_rejects_an_unknown_implementation(ext, parallel_settings):
    with pytest.raises(RuntimeError, match="expected 'pool' or 'aten'"):
        cpu_ext.parallel("openmp")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_gemv_matches_float64_reference(ext, parallel_settings, dtype):
    torch.manual_seed(0)
    V, d = 1037, 200  # not multiples of the 4-row blocks, 16-row chunks or 8/16-wide vectors
    w = torch.randn(V, d) * 0.05
    scale = None
    if dtype == "int8":
        w, scale = quantize_rows(w)
    else:
        w = w.to(getattr(torch, dtype))
    x = torch.randn(3, d)
    full = w.double() * (scale.double()[:, None] if scale is not None else 1)
    want = x.double() @ full.T
    for int16_x in (False, True):
        first = None
        for impl, threads in (("pool", 1), ("pool", 2), ("aten", 1), ("aten", 2)):
            _use(ext, impl, threads)
            got = ext.gemv(x, w, scale, int16_x)
            assert got.shape == (3, V) and got.dtype == torch.float32
            # int16 activations (int8 weights only) round x to 14 bits of its largest entry
            tol = 2e-4 if int16_x and dtype == "int8" else 1e-5
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
            first = got if first is None else first
            assert torch.equal(got, first), (impl, threads)


def test_huge_page_tensor_is_aligned_and_usable(ext):
    t = ext.huge_empty([3, 1000, 700], torch.int8)
    assert t.shape == (3, 1000, 700) and t.dtype == torch.int8 and t.data_ptr() % (1 << 21) == 0
    t.fill_(3)
    assert int(t.sum()) == 3 * 3 * 1000 * 700


def test_thread_pool_runs_every_chunk_once_for_its_own_job(ext):
    # back-to-back jobs of n and 2n chunks: where a worker finishing the smaller job could claim a chunk of the next,
    # larger one before it is published (the chunk runs with a freed job: a segfault, or a chunk counted twice:
    # outputs still being written after the call returns). A child process, so that a crash is a failure here
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores for a worker thread")
    code = ("from memoryformer.ops import cpu_ext; ext = cpu_ext.get(); cpu_ext.threads(2); "
            "assert cpu_ext.threads() == 2; "
            "print(sum(ext.pool_selftest(100000, n, spin) for n in (2, 3, 8) for spin in (0, 30)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the pool self-test died (exit {r.returncode}): {r.stderr[-2000:]}"
    assert r.stdout.strip() == "0", f"jobs with a chunk not run exactly once: {r.stdout.strip()}"
