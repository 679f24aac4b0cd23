"""The Triton backend's self-check (`triton_backend.self_check`): fed a deliberately wrong kernel, or one that
raises, it logs one warning line and the layer then runs on F.embedding_bag; fed the real kernels (under the
Triton interpreter, on CPU tensors) it passes. In a subprocess: TRITON_INTERPRET must be set before triton is
imported and must not leak into other tests."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              pytest.mark.slow]  # ~1 min on 2 cores under the interpreter

SCRIPT = textwrap.dedent("""
    import json, logging
    import torch
    from memoryformer import MemoryLayer
    from memoryformer.ops import lookup_embedding_bag, triton_backend as tb, triton_kernels as tk

    lines = []
    class Grab(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    logging.getLogger("memoryformer").addHandler(Grab())
    out = {}

    def wrong(codes, w, tables):  # off by 10 % everywhere
        return 1.1 * tk.lookup(codes, w, tables)

    def broken(x, tables, bias, **kw):
        raise RuntimeError("CompilationError: at 3:4: simulated")

    out["real"] = tb.self_check("cpu", torch.float32)
    out["real_bf16"] = tb.self_check("cpu", torch.bfloat16)
    out["real_f64"] = tb.self_check("cpu", torch.float64)
    out["lines_after_real"] = len(lines)
    tb.forget_verdicts()

    torch.manual_seed(0)
    layer = MemoryLayer(16, 24, tau=4, backend="triton")
    x = torch.randn(5, 16, requires_grad=True)
    y_trusted = layer(x)
    out["wrong"] = tb.self_check("cpu", torch.float32, lookup=wrong, layer=tk.layer_forward)
    out["verdict"] = tb.verdict("cpu", torch.float32)
    out["verdict_bf16"] = tb.verdict("cpu", torch.bfloat16)
    y = layer(x)
    y.sum().backward()
    from memoryformer.ops import chunk_hash
    c, w = chunk_hash(x.detach(), 4, weighting=layer.weighting)
    bag = lookup_embedding_bag(c, w, layer.tables.detach()) + layer.bias.detach()
    out["layer_is_embedding_bag"] = torch.allclose(y, bag, atol=1e-6, rtol=0)
    out["layer_matched_before"] = torch.allclose(y, y_trusted, atol=1e-5)
    out["grads_flow"] = bool(x.grad is not None and layer.tables.grad is not None
                             and layer.tables.grad.abs().sum() > 0)
    out["lines_after_wrong"] = len(lines)
    tb.forget_verdicts()

    out["raises"] = tb.self_check("cpu", torch.float32, lookup=tk.lookup, layer=broken)
    out["lines"] = lines
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def result() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_real_kernels_pass(result):
    assert result["real"] is None and result["real_bf16"] is None and result["real_f64"] is None
    assert result["lines_after_real"] == 0


def test_a_wrong_kernel_falls_back_to_embedding_bag_with_one_warning(result):
    # every lookup entry is 10 % off: whichever the max picks among equal errors, the verdict names the lookup
    assert result["wrong"] and result["wrong"].startswith("lookup ") and " off by 0.1 " in result["wrong"], \
        result["wrong"]
    assert result["verdict"] == result["wrong"] and result["verdict_bf16"] is None  # keyed by (device, dtype)
    assert result["layer_is_embedding_bag"] and result["layer_matched_before"] and result["grads_flow"]
    assert result["lines_after_wrong"] == 1
    line = result["lines"][0]
    assert "self-check" in line and "float32" in line and "embedding_bag" in line and "off by" in line


def test_a_kernel_that_raises_falls_back(result):
    assert result["raises"].startswith("RuntimeError: CompilationError"), result["raises"]
    assert len(result["lines"]) == 2 and "CompilationError" in result["lines"][1]
