"""What checkpoint verification costs per GB: SHA-256 of a file (from the page cache) and the NaN/inf check of a
float32 tensor, medians of 3, with the load average (run it on an otherwise idle machine)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

import torch  # noqa: E402

from memoryformer import integrity  # noqa: E402


def median_s(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the file and of the tensor (default 1 GiB)")
    args = ap.parse_args(argv)
    n = int(args.gib * (1 << 30))
    print("load average %.2f %.2f %.2f at start" % os.getloadavg())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "blob.bin"
        path.write_bytes(os.urandom(n))
        path.read_bytes()  # into the page cache: what is timed is the hash, not the disk

        def sha():
            integrity._verified.clear()
            integrity.sha256_file(path)

        s = median_s(sha)
    print(f"SHA-256 of {n / 1e9:.2f} GB: {s:.2f} s = {n / 1e9 / s:.2f} GB/s, {s / (n / 1e9):.2f} s per GB (one core)")
    x = torch.randn(n // 4)
    s = median_s(lambda: integrity.check_finite({"x": x}, "x"))
    print(f"NaN/inf check of {n / 1e9:.2f} GB float32: {s:.2f} s per GB ({torch.get_num_threads()} threads)")
    print("load average %.2f %.2f %.2f at end" % os.getloadavg())


if __name__ == "__main__":
    main()
