"""The prepared GPU suite (benchmarks/gpu_suite.py) runs end to end as a dry run: tiny shapes on CPU under the
Triton interpreter, in a subprocess (TRITON_INTERPRET must be set before triton is imported), so that it still
works the day a GPU is lent. Every part must run without error and produce its figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              pytest.mark.slow]  # ~1.5 min on 2 cores; CI runs the slow tests too


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "] part f ok in" in proc.stdout  # timestamped progress lines
    return json.loads((out / "suite.json").read_text()), (out / "summary.md").read_text()


def _results(data, part):
    p = data["parts"][part]
    assert p["status"] == "ok", p.get("error")
    return p["results"]


def test_every_part_ran(suite):
    data, _ = suite
    assert list(data["parts"]) == list("abcdef")
    assert all(p["status"] == "ok" and "error" not in p for p in data["parts"].values())
    assert not data["skipped"]
    assert data["meta"]["dry_run"] and data["meta"]["triton_interpret"]


def test_correctness_below_tolerance(suite):
    res = _results(suite[0], "a")
    cases = res["cases"]
    assert {(c["dtype"], c["weighting"], c["table_grad"]) for c in cases} == {
        (dt, w, g) for dt in ("float32", "bfloat16") for w in ("release", "paper") for g in ("sorted", "atomic")}
    for c in cases:
        assert c["ok"] and 0 <= c["max_error"] <= c["tol"], c
        assert len(c["errors"]) == 9 and all(0 <= e <= c["tol"] for e in c["errors"].values()), c
    assert max(c["max_error"] for c in cases if c["dtype"] == "float32") < 1e-5
    assert res["opcheck"] == dict.fromkeys(
        ["lookup_triton", "lookup_triton_backward", "layer_triton", "layer_triton_input_grad"], "ok")
    assert res["compile"]["ok"] and max(res["compile"]["errors"].values()) < 1e-4
    assert res["all_ok"] is True


def test_layer_and_block_timings(suite):
    data, _ = suite
    layer = _results(data, "b")
    assert layer["kernel"] == "triton" and layer["row_bytes_per_s"] > 0
    for mode in ("fwd", "fwdbwd"):
        assert layer[mode]["linear_s"] > 0 and layer[mode]["memory_layer_s"] > 0 and layer[mode]["ratio"] > 0
    blocks = _results(data, "c")["blocks"]
    assert blocks and all(b["kernel"] == ["triton"] for b in blocks)
    for b in blocks:
        for mode in ("fwd", "fwdbwd"):
            assert b[mode]["pythia_s"] > 0 and b[mode]["memoryformer_s"] > 0, b


def test_training_and_decode_rates(suite):
    data, _ = suite
    train = _results(data, "d")
    assert set(train["models"]) == {"tiny", "pythia-70m"}
    for name, m in train["models"].items():
        assert m["tokens_per_s"] > 0 and m["step_s"] > 0 and m["loss"] > 0, (name, m)
    assert train["models"]["tiny"]["kernel"] == ["triton"] and train["ratios"]["tiny/pythia-70m"] > 0
    decode = _results(data, "e")
    assert set(decode["tokens_per_s"]) == {"memoryformer", "hf_static_eager", "hf_static"}
    assert all(v > 0 for v in decode["tokens_per_s"].values())
    assert set(decode["ratio_vs_hf"]) == {"hf_static_eager", "hf_static"}


def test_tile_sweep_keeps_the_best(suite):
    data, _ = suite
    res = _results(data, "f")
    names = {"FWD_BLOCK_N", "FWD_BLOCK_H", "BWD_BLOCK_N", "BWD_BLOCK_H", "SEG_BLOCK_T", "SEG_BLOCK_H"}
    assert set(res["best_tiles"]) == names and data["best_tiles"] == res["best_tiles"]
    assert not res["errors"]
    for kind, n, h in (("fwd", "FWD_BLOCK_N", "FWD_BLOCK_H"), ("bwd", "BWD_BLOCK_N", "BWD_BLOCK_H"),
                       ("seg", "SEG_BLOCK_T", "SEG_BLOCK_H")):
        times = res["sweep"][kind]
        assert len(times) >= 2 and all(t > 0 for t in times.values())
        best = f"{res['best_tiles'][n]}x{res['best_tiles'][h]}"
        assert times[best] == min(t for k, t in times.items() if k != "atomic")
    assert "atomic" in res["sweep"]["seg"]


def test_summary_reports_the_targets(suite):
    data, summary = suite
    assert [t["value"] is not None for t in data["targets"]] == [True] * 4
    assert data["targets"][0]["met"] is True
    assert "stretch" in data["targets"][1]
    for t in data["targets"]:
        assert t["target"] in summary
    assert data["meta"]["device"] in summary
    assert f"torch {data['meta']['torch']}" in summary and "triton" in summary


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def test_a_failing_part_is_recorded_and_the_guard_skips(tmp_path):
    code = f"""
import sys
sys.argv = ["gpu_suite.py", "--dry-run"]
import gpu_suite as g

def boom(s, res):
    res["measured_before_the_failure"] = 1.0
    raise RuntimeError("injected failure")

g.part_layer = boom
g.DRY["est"]["c"] = 1e9  # cannot fit any budget
g.main(["--out", {str(tmp_path)!r}, "--dry-run", "--parts", "b,c"])
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "suite.json").read_text())
    b, c = data["parts"]["b"], data["parts"]["c"]
    assert b["status"] == "error" and b["error"]["type"] == "RuntimeError"
    assert b["error"]["message"] == "injected failure" and "boom" in b["error"]["traceback"]
    assert b["results"] == {"measured_before_the_failure": 1.0}
    assert c["status"] == "skipped" and any(x.startswith("part c (block)") for x in data["skipped"])
    summary = (tmp_path / "summary.md").read_text()
    assert "| b layer | error |" in summary and "injected failure" in summary and "## Skipped" in summary


def test_unknown_part_is_refused(tmp_path):
    proc = _run(f"import gpu_suite as g; g.main(['--out', {str(tmp_path)!r}, '--parts', 'a,z'])", tmp_path)
    assert proc.returncode == 2 and "--parts: unknown part 'z'" in proc.stderr
