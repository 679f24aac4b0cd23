"""The server's counters and latency histograms, written in the Prometheus text format (no client library)."""

from __future__ import annotations

import bisect
import threading

# seconds: time to first token spans a queue wait plus a prefill; between tokens one step of every active row
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative buckets, sum and count, as a Prometheus histogram."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """What the scheduler counts; `render(queue_depth, active, max_batch)` gives the /metrics page."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected = 0

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def tokens(self, n: int, gaps: list[float]) -> None:
        with self.lock:
            self.generated_tokens += n
            for g in gaps:
                self.itl.observe(g)

    def prompt(self, n: int) -> None:
        with self.lock:
            self.prompt_tokens += n

    def finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def reject(self) -> None:
        with self.lock:
            self.rejected += 1

    def render(self, queue_depth: int, active: int, max_batch: int) -> str:
        p = "memoryformer_serve"
        with self.lock:
            lines = [
                f"# HELP {p}_queue_depth Requests waiting for a slot.", f"# TYPE {p}_queue_depth gauge",
                f"{p}_queue_depth {queue_depth}",
                f"# HELP {p}_active_slots Slots decoding a request.", f"# TYPE {p}_active_slots gauge",
                f"{p}_active_slots {active}",
                f"# HELP {p}_max_slots Slots the server holds (--max-batch).", f"# TYPE {p}_max_slots gauge",
                f"{p}_max_slots {max_batch}",
                f"# HELP {p}_prompt_tokens_total Prompt tokens prefilled.", f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_generated_tokens_total Tokens sampled.", f"# TYPE {p}_generated_tokens_total counter",
                f"{p}_generated_tokens_total {self.generated_tokens}",
                f"# HELP {p}_rejected_total Requests refused because the queue was full.",
                f"# TYPE {p}_rejected_total counter", f"{p}_rejected_total {self.rejected}",
                f"# HELP {p}_requests_total Requests finished, by finish reason.", f"# TYPE {p}_requests_total counter",
            ]
            lines += [f'{p}_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())]
            lines += [f"# HELP {p}_time_to_first_token_seconds From arrival to the first token.",
                      f"# TYPE {p}_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines(f"{p}_time_to_first_token_seconds")
            lines += [f"# HELP {p}_inter_token_seconds Between two tokens of one request.",
                      f"# TYPE {p}_inter_token_seconds histogram"]
            lines += self.itl.lines(f"{p}_inter_token_seconds")
        return "\n".join(lines) + "\n"
