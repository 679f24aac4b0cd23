"""The Triton backend against the float64 reference: on CPU tensors through the Triton interpreter (in a
subprocess, because TRITON_INTERPRET must be set before triton is imported and must not leak into other tests),
and on CUDA in-process when a GPU is present."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import triton_cases  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(triton_cases.__file__)), "cpu"], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"interpreter run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(triton_cases.CASES))
def test_interpreter(case, interpreter_results):
    assert interpreter_results[case] == "ok", interpreter_results[case]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", sorted(triton_cases.CASES))
def test_cuda(case):
    triton_cases.CASES[case]("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_picks_triton_on_cuda():
    from memoryformer import MemoryLayer

    layer = MemoryLayer(64, 64, tau=8, device="cuda")
    assert layer.active_backend() == "triton"
    with torch.no_grad():
        assert layer.to(torch.bfloat16).active_backend() == "triton"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_cuda(dtype):
    from memoryformer import MemoryLayer

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MemoryLayer(64, 96, tau=8, device="cuda", dtype=dtype)
    x = torch.randn(4, 33, 64, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.compile(layer, fullgraph=True)(x)
    gx, gt = torch.autograd.grad(y.float().square().sum(), [x, layer.tables])
    ref = layer(x)
    rx, rt = torch.autograd.grad(ref.float().square().sum(), [x, layer.tables])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gt, rt, **tol)
