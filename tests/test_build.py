"""The kernel build cannot hang or run silently: per-checkout folders, dead owners' locks taken at once, live ones
named while waited for, a time limit that falls back with one line."""

import os
import signal
import subprocess
import sys
import time

import pytest

from memoryformer.ops import build

TRIVIAL = '#include <torch/extension.h>\nint answer() { return 42; }\n' \
          'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }\n'
HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": %d, \"host\": \"h\"}' % os.getpid()); "
        "print('held', flush=True); time.sleep(60)")


def test_names_differ_per_checkout_and_per_source(tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("int x;")
    a = build.extension_name("mf", [src], "avx2", checkout=tmp_path / "a")
    assert a == build.extension_name("mf", [src], "avx2", checkout=tmp_path / "a")
    assert a != build.extension_name("mf", [src], "avx2", checkout=tmp_path / "b")
    assert a != build.extension_name("mf", [src], "avx512f", checkout=tmp_path / "a")
    src.write_text("int y;")
    assert a != build.extension_name("mf", [src], "avx2", checkout=tmp_path / "a")


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_dead_owners_lock_is_taken_at_once_and_a_live_one_is_named(tmp_path, caplog):
    folder = tmp_path / "ext"
    proc = _holder(f"{folder}.owner")
    with pytest.raises(build.BuildError, match=rf"pid {proc.pid} on h has been building the CPU kernels"):
        with build.OwnerLock(folder, wait_s=1.0):
            pass
    assert "waiting for pid" in caplog.text
    proc.send_signal(signal.SIGKILL)  # a build killed mid-way: its lock file stays, its flock does not
    proc.wait()
    start = time.monotonic()
    with build.OwnerLock(folder, wait_s=30.0) as lock:
        assert time.monotonic() - start < 2.0
        assert f'"pid": {os.getpid()}' in os.pread(lock.fd, 256, 0).decode()


def _trivial(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    src = tmp_path / "trivial.cpp"
    src.write_text(TRIVIAL)
    return build.extension_name("mf_trivial", [src], checkout=tmp_path), [str(src)]


def test_a_build_over_the_time_limit_fails_in_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    name, sources = _trivial(tmp_path, monkeypatch)
    monkeypatch.setenv(build.TIMEOUT_ENV, "1")
    with pytest.raises(build.BuildError, match=r"did not finish within 1 s"):
        build.load(name, sources, ["-O0"], [])
    assert not (build.build_dir(name) / "lock").exists() and not build.is_built(name)


@pytest.mark.slow
def test_a_stale_torch_lock_does_not_block_the_build(tmp_path, monkeypatch, caplog):
    name, sources = _trivial(tmp_path, monkeypatch)
    build.build_dir(name).mkdir(parents=True, exist_ok=True)
    (build.build_dir(name) / "lock").write_text("")  # what a build killed inside torch's builder leaves
    module = build.load(name, sources, ["-O0"], [])
    assert module.answer() == 42 and build.is_built(name)
    assert "building the CPU kernels" in caplog.text and "CPU kernels built in" in caplog.text
