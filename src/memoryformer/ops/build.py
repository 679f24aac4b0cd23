"""Building the compiled CPU kernels so that a build can neither hang nor run silently.

torch's extension builder compiles in the calling process, waits for ever on the lock file of a build that was
killed, and keys its folder by name only, so two checkouts of the same sources rebuild each other's (the build files
hold absolute paths). Here:

- the folder name carries a digest of the sources, the CPU's flags and this checkout's path;
- one line says that a build starts (what, why, about how long) and one that it ended;
- builders of one folder take an advisory `flock` on `<folder>.owner` first, holding the owner's pid and host; the
  kernel drops it when the owner dies, so a lock left by a killed build is taken at once (and torch's own stale lock
  file removed), while a live owner is waited for with a line naming it;
- the compiler runs in a child process with a time limit (MEMORYFORMER_BUILD_TIMEOUT, default 600 s); the child
  inherits the lock, so a parent killed by SIGTERM leaves either a finished build or nothing that blocks the next;
- a build that fails or runs out of time raises `BuildError`, and the caller falls back to the ATen path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from memoryformer.config import MemoryFormerError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, builds are not serialised
    fcntl = None

log = logging.getLogger("memoryformer")

TIMEOUT_ENV = "MEMORYFORMER_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # a build takes 1-3 minutes on 2 cores; 10 means something is wrong


class BuildError(MemoryFormerError):
    """The kernels could not be built (compiler error, time limit, or another builder that never finished)."""


def extension_name(base: str, files, extra: str = "", checkout: Path | None = None) -> str:
    """`base_<digest>`: the digest covers the files' bytes, `extra` (the CPU's flags) and the checkout's path
    (default: the folder this package is imported from)."""
    h = hashlib.sha256(str(Path(checkout or Path(__file__).parent).resolve()).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    h.update(extra.encode())
    return f"{base}_{h.hexdigest()[:12]}"


def build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def is_built(name: str) -> bool:
    d = build_dir(name)
    return (d / f"{name}.so").is_file() or any(d.glob(f"{name}_v*.so"))


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise BuildError(f"{TIMEOUT_ENV}: expected a number of seconds, got {text!r}") from None


class OwnerLock:
    """Exclusive `flock` on `<build folder>.owner`; the holder's pid and host are written into it."""

    def __init__(self, folder: Path, wait_s: float):
        self.path, self.wait_s, self.fd = Path(f"{folder}.owner"), wait_s, None

    def __enter__(self) -> "OwnerLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        if fcntl is None:
            return self
        deadline, said = time.monotonic() + self.wait_s, False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if not said:
                    log.warning("memoryformer: waiting for %s, which is building the CPU kernels in %s",
                                self.holder(), self.path.with_suffix(""))
                    said = True
                if time.monotonic() > deadline:
                    who = self.holder()
                    os.close(self.fd)
                    raise BuildError(f"{who} has been building the CPU kernels for more than {self.wait_s:.0f} s") from None
                time.sleep(0.5)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        return self

    def holder(self) -> str:
        try:
            rec = json.loads(os.pread(self.fd, 256, 0) or b"{}")
            return f"pid {rec['pid']} on {rec['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def load(name: str, sources: list[str], cflags: list[str], include: list[str], ldflags: list[str] = ()):
    """The built module `name` (compiling it first in a child process if needed), or BuildError."""
    from torch.utils.cpp_extension import load as torch_load

    kw = dict(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=list(ldflags), extra_include_paths=include,
              verbose=False)
    if not is_built(name):
        folder, limit = build_dir(name), timeout_s()
        with OwnerLock(folder, wait_s=limit) as lock:
            if not is_built(name):  # another process may have finished it while we waited
                (folder / "lock").unlink(missing_ok=True)  # torch's, left by a killed build: no live builder now
                log.warning("memoryformer: building the CPU kernels for this CPU (first use of this checkout; about "
                            "1-3 minutes, once; cached in %s)", folder)
                start = time.monotonic()
                _compile_in_child(kw, limit, lock.fd)
                log.warning("memoryformer: CPU kernels built in %.0f s", time.monotonic() - start)
    return torch_load(**kw)


def _compile_in_child(kw: dict, limit: float, lock_fd: int) -> None:
    code = ("import json, sys; from torch.utils.cpp_extension import load; "
            "load(**json.loads(sys.argv[1]))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(kw)], pass_fds=(lock_fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        (build_dir(kw["name"]) / "lock").unlink(missing_ok=True)
        raise BuildError(f"the build did not finish within {limit:.0f} s ({TIMEOUT_ENV})") from None
    if proc.returncode != 0:
        lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
        raise BuildError(f"the compiler failed ({lines[-1] if lines else f'exit {proc.returncode}'})")
