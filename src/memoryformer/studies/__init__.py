"""Studies built on the library: the CPU demo (`demo`), the paper's ablations (`ablate`), and the equal-token
comparison both they and `benchmarks/quality.py` run (`rounds`)."""
