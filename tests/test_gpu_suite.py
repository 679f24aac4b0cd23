"""The prepared GPU suite (benchmarks/gpu_suite.py) runs end to end as a dry run: tiny shapes on CPU under the
Triton interpreter, in a subprocess (TRITON_INTERPRET must be set before triton is imported), so that it still
works the day a GPU is lent. Every part must run without error and produce its figures; its guards (a part or a
candidate that raises, a CUDA error that poisons the process, the time alarm inside a part) must keep the rest."""

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
    assert "] part f ok in" in proc.stdout and "] part a ok in" in proc.stdout  # timestamped progress lines
    return json.loads((out / "suite.json").read_text()), (out / "summary.md").read_text()


def _results(data, part):
    p = data["parts"][part]
    assert p["status"] == "ok", p.get("error")
    return p["results"]


def test_every_part_ran(suite):
    data, _ = suite
    assert list(data["parts"]) == list("abcdef")
    assert all(p["status"] == "ok" and "error" not in p for p in data["parts"].values())
    assert not data["skipped"] and not data["restarts"] and len(data["runs"]) == 1
    assert data["meta"]["dry_run"] and data["meta"]["triton_interpret"]


def test_correctness_at_every_preset_shape(suite):
    res = _results(suite[0], "a")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_correctness import layer_shapes
    from gpu_suite import DRY

    want = {(x["d_in"], x["d_out"], x["tau"]) for x in layer_shapes(DRY["presets"], DRY["over"])}
    assert {(x["d_in"], x["d_out"], x["tau"]) for x in res["shapes"]} == want
    assert {x["layer"] for x in res["shapes"]} == {"attn.qkv", "mlp.l1", "mlp.l2"}  # qkv, and the block's l2
    assert any(x["tau"] == DRY["over"]["tau"] + 2 for x in res["shapes"])  # tau + expand_bits bits
    assert res["self_check"] == {"float32": "ok", "bfloat16": "ok"}
    cases = res["cases"]
    assert {(c["d_in"], c["d_out"], c["tau"], c["dtype"]) for c in cases} == {
        (*k, dt) for k in want for dt in ("float32", "bfloat16")}
    assert {c["weighting"] for c in cases} == {"paper", "release"}
    for c in cases:
        assert c["ok"] and c["nonfinite"] == 0, c
        assert len(c["errors"]) == 10 and "atomic_grad_tables" in c["errors"], c
        for e in c["errors"].values():
            assert 0 <= e["max"] <= c["tol"]["max"] and 0 <= e["norm"] <= c["tol"]["norm"], c
    assert max(c["worst_max"] for c in cases if c["dtype"] == "float32") < 1e-5
    assert set(res["opcheck"]) == {"lookup_triton", "lookup_triton_backward", "layer_triton",
                                   "layer_triton_input_grad"}
    assert all(v == {"test_schema": "ok", "test_autograd_registration": "ok", "test_faketensor": "ok"}
               for v in res["opcheck"].values())
    assert res["compile"]["ok"] and max(e["max"] for e in res["compile"]["errors"].values()) < 1e-4
    assert res["all_ok"] is True


def test_poisoning_and_the_metrics_can_fail():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from gpu_correctness import compare, poisoned

    with poisoned():
        assert torch.isnan(torch.empty(3)).all()
    ref = torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    small = compare(torch.tensor([100.0, 1.5, 1.5, 1.5]), ref)  # wrong small elements
    assert small["max"] == pytest.approx(0.005) and small["norm"] == pytest.approx(0.866 / 100.01, rel=1e-3)
    assert compare(torch.tensor([100.0, float("nan"), 1.0, 1.0]), ref)["nonfinite"] == 1


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
    decode = _results(data, "f")
    assert list(decode["candidates"]) == ["memoryformer", "dense_pythia", "hf_static_eager", "hf_static_compiled"]
    assert all(v["tokens_per_s"] > 0 for v in decode["candidates"].values())
    assert decode["ratio_vs_dense"] > 0 and set(decode["ratio_vs_hf"]) == {"hf_static_eager", "hf_static_compiled"}


def test_tile_sweep_keeps_the_best(suite):
    data, _ = suite
    res = _results(data, "e")
    assert set(res["best_tiles"]) == {"fwd", "bwd", "seg"} and data["best_tiles"] == res["best_tiles"]
    assert not res["errors"]
    for kind in ("fwd", "bwd", "seg"):
        times = res["sweep"][kind]
        assert len(times) >= 2 and all(t > 0 for t in times.values())
        best = "x".join(map(str, res["best_tiles"][kind]))
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
    assert "Parts to run again" not in summary


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)


PRELUDE = """
import sys, time
sys.argv = ["gpu_suite.py", "--dry-run"]
import gpu_suite as g
"""


def test_a_failing_part_is_recorded_and_the_guard_skips(tmp_path):
    code = PRELUDE + f"""
def boom(s, res):
    res["measured_before_the_failure"] = 1.0
    raise RuntimeError("injected failure")

g.FNS["b"] = boom
g.DRY["est"]["block"] = 1e9  # cannot fit any budget
g.main(["--out", {str(tmp_path)!r}, "--dry-run", "--parts", "c,b"])
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "suite.json").read_text())
    assert list(data["parts"]) == ["b", "c"]  # run in the suite's order
    b, c = data["parts"]["b"], data["parts"]["c"]
    assert b["status"] == "error" and b["error"]["type"] == "RuntimeError"
    assert b["error"]["message"] == "injected failure" and "boom" in b["error"]["traceback"]
    assert b["results"] == {"measured_before_the_failure": 1.0}
    assert c["status"] == "skipped" and [x["what"] for x in data["skipped"]] == ["part c (block)"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| b layer | error |" in summary and "injected failure" in summary and "## Skipped" in summary
    assert "Parts to run again: `--parts b,c`" in summary


def test_a_failing_candidate_keeps_the_others(tmp_path):
    code = PRELUDE + f"""
import gpu_parts
real = gpu_parts._decoder
def decoder(s, name, prompt, new):
    if name.startswith("hf"):
        raise RuntimeError("no transformers for " + name)
    return real(s, name, prompt, new)
gpu_parts._decoder = decoder
g.main(["--out", {str(tmp_path)!r}, "--dry-run", "--parts", "f"])
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f = json.loads((tmp_path / "suite.json").read_text())["parts"]["f"]
    assert f["status"] == "partial"
    cands = f["results"]["candidates"]
    assert cands["memoryformer"]["tokens_per_s"] > 0 and cands["dense_pythia"]["tokens_per_s"] > 0
    assert cands["hf_static_eager"]["error"]["message"] == "no transformers for hf_static_eager"
    assert "error" in cands["hf_static_compiled"] and f["results"]["ratio_vs_dense"] > 0


def test_a_cuda_error_continues_in_a_fresh_process_and_merges(tmp_path):
    code = PRELUDE + f"""
import os
def poison(s, res):
    res["before"] = os.getpid()
    raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

g.FNS["b"] = poison
g.main(["--out", {str(tmp_path)!r}, "--dry-run", "--parts", "b,d"])
raise SystemExit("main returned: the rest did not move to a fresh process")
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert "continue in a fresh process" in proc.stdout
    data = json.loads((tmp_path / "suite.json").read_text())
    assert list(data["parts"]) == ["b", "d"]
    b, d = data["parts"]["b"], data["parts"]["d"]
    assert b["status"] == "error" and "illegal memory access" in b["cuda_error"]
    assert d["status"] == "ok" and d["results"]["models"]["tiny"]["tokens_per_s"] > 0
    assert data["restarts"] == [dict(after="b", parts=["d"], reason=data["restarts"][0]["reason"])]
    assert len(data["runs"]) == 2 and "--merge" in data["runs"][1]["command"]
    assert "--parts d" in data["runs"][1]["command"]
    summary = (tmp_path / "summary.md").read_text()
    assert "ran in a fresh process" in summary and "| d training | ok |" in summary and "| b layer | error |" in summary


def test_the_alarm_stops_a_part_that_overruns(tmp_path):
    code = PRELUDE + f"""
def slow(s, res):
    for i in range(10**6):
        res["steps"] = i
        time.sleep(0.05)

g.FNS["b"] = slow
g.main(["--out", {str(tmp_path)!r}, "--dry-run", "--parts", "b,c", "--time-budget",
        str(time.monotonic() - g.START + 15)])
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "suite.json").read_text())
    b, c = data["parts"]["b"], data["parts"]["c"]
    assert b["status"] == "stopped" and b["error"]["type"] == "OutOfTime" and b["results"]["steps"] > 5
    assert 0.5 < b["seconds"] < 15 and c["status"] == "skipped"


def test_merge_keeps_the_earlier_parts(tmp_path):
    first = tmp_path / "run1"
    code = PRELUDE + f"""
g.FNS["b"] = lambda s, res: res.update(mark="first")
g.FNS["c"] = lambda s, res: res.update(mark="first")
g.main(["--out", {str(first)!r}, "--dry-run", "--parts", "b,c"])
g.FNS["c"] = lambda s, res: res.update(mark="second")
g.main(["--out", {str(tmp_path / "run2")!r}, "--dry-run", "--parts", "c", "--merge", {str(first / "suite.json")!r}])
"""
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "run2" / "suite.json").read_text())
    assert data["parts"]["b"]["results"] == {"mark": "first"} and data["parts"]["c"]["results"] == {"mark": "second"}
    assert len(data["runs"]) == 2


def test_unknown_part_and_missing_merge_file_are_refused(tmp_path):
    proc = _run(f"import gpu_suite as g; g.main(['--out', {str(tmp_path)!r}, '--parts', 'a,z'])", tmp_path)
    assert proc.returncode == 2 and "--parts: unknown part 'z'" in proc.stderr
    proc = _run(f"import gpu_suite as g; g.main(['--out', {str(tmp_path)!r}, '--dry-run', '--merge', 'nope.json'])",
                tmp_path)
    assert proc.returncode == 2 and "--merge: no such file 'nope.json'" in proc.stderr
