"""`memoryformer train --nproc-per-node N`: N training processes on this machine, as torchrun starts them, with a
clean Ctrl-C.

Each rank is `python -m memoryformer <the same arguments>` with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and OMP_NUM_THREADS = cores / N unless set. The ranks run in their own session, so a
terminal's Ctrl-C reaches only this launcher, which passes each SIGINT / SIGTERM on to every rank exactly once: the
first makes all ranks finish their step, save a checkpoint and exit (rank 0 says so in one line); a second aborts.
torchrun does the same for the ranks but then raises its own exception (a long traceback) in the launcher.
If one rank fails, the others are stopped and the launcher exits with the failed rank's code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

FLAG = "--nproc-per-node"


def strip_flag(argv: list[str]) -> list[str]:
    """`argv` without `--nproc-per-node N` / `--nproc-per-node=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == FLAG:
            skip = True
        elif not a.startswith(FLAG + "="):
            out.append(a)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def run_local(nproc: int, argv: list[str]) -> int:
    """Run `memoryformer *argv` (without the launcher flag) as `nproc` ranks; the exit code for the launcher:
    0 when all finished, 130 when interrupted, else the first failed rank's."""
    port, args = free_port(), strip_flag(argv)
    procs = [subprocess.Popen([sys.executable, "-m", "memoryformer", *args], env=rank_env(r, nproc, port),
                              start_new_session=True) for r in range(nproc)]
    signals = {signal.SIGINT: None, signal.SIGTERM: None}

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in signals:
        signals[sig] = signal.signal(sig, forward)
    try:
        failed, deadline = None, None
        while any(p.poll() is None for p in procs):
            if failed is None:
                failed = next((p for p in procs if p.returncode not in (None, 0, 130)), None)
                if failed is not None:  # the others would wait for it in a collective: stop them
                    forward(signal.SIGTERM, None)
                    deadline = time.monotonic() + 30
            elif time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for sig, old in signals.items():
            signal.signal(sig, old)
    codes = [p.returncode for p in procs]
    if failed is None:
        failed = next((p for p in procs if p.returncode not in (0, 130)), None)
    if failed is not None:
        return failed.returncode if failed.returncode > 0 else 128 - failed.returncode  # -N: killed by signal N
    return 130 if 130 in codes else 0
