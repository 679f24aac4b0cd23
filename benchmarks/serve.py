"""Serving load: C concurrent streaming clients against `memoryformer serve` (and optionally llama.cpp's
`llama-server`), on 127.0.0.1 only, bounded in requests and time.

    python benchmarks/serve.py --checkpoint runs/micro/final --tables int8 --save
    python benchmarks/serve.py --checkpoint CKPT --tables int8 --concurrency 1,4 --requests 8 --rounds 1 \\
        --label smoke --save                                     # a quick check that everything works
    python benchmarks/serve.py --checkpoint CKPT --tables int8 --llama-server ~/llama.cpp/build/bin/llama-server \\
        --gguf model-q8_0.gguf --save                            # the same load against llama.cpp

Each client sends its next request as soon as its last one ends (closed loop). Request i of a round has a prompt of
seeded random token ids (length uniform in --prompt-len) and asks for exactly its output length (uniform in
--output-len; `ignore_eos`, greedy), streamed as server-sent events from /v1/completions. Per concurrency C the
systems run in interleaved rounds (ours, llama.cpp, ours, ...); llama-server is started with `-np C` for each C and
the same threads. Reported per system and C: aggregate output tokens/s (tokens of every request over the round's
wall time, median of rounds), requests/s, time to first token p50/p99, the gap between streamed chunks p50/p99
(a chunk is one token except where a token ends inside a UTF-8 character), the time per output token of each
request p50/p99, errors, the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # never anything else: this load generator only targets this machine
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# -- the servers ---------------------------------------------------------------------------------------------------


class Process:
    """A server on HOST:port started as a subprocess, ready once `health` answers 200; `stop()` sends SIGTERM."""

    def __init__(self, name: str, cmd: list[str], port: int, health: str, env=None, timeout: float = 300):
        self.name, self.url = name, f"http://{HOST}:{port}"
        self.log = tempfile.NamedTemporaryFile("w", prefix=f"serve-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name}: exited with {self.proc.returncode} before it was ready "
                                 f"(see {self.log.name})")
            if time.time() > deadline:
                self.stop()
                raise SystemExit(f"{name}: not ready after {timeout:.0f} s (see {self.log.name})")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return self.proc.wait()


def start_ours(args, max_batch: int) -> Process:
    port = free_port()
    cmd = [sys.executable, "-m", "memoryformer", "serve", "--checkpoint", args.checkpoint, "--host", HOST,
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch),
           "--threads", str(args.threads), "--no-verify"]
    if args.tables:
        cmd += ["--tables", args.tables]
    if args.prefill_chunk:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    if args.spin_us is not None:
        cmd += ["--spin-us", str(args.spin_us)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return Process("memoryformer", cmd, port, "/health", env=env)


def start_llama(args, c: int, context: int) -> Process:
    port = free_port()
    cmd = [args.llama_server, "-m", args.gguf, "--host", HOST, "--port", str(port), "-np", str(c),
           "-c", str(c * context), "-t", str(args.threads), "-tb", str(args.threads)]
    return Process("llama.cpp", cmd, port, "/health")


# -- the load ------------------------------------------------------------------------------------------------------


def workload(n: int, seed: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int):
    """n (prompt ids, output length) pairs, the same for every system and round of a concurrency."""
    rng = random.Random(seed)
    return [([rng.randrange(1000, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
            for _ in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], n_out: int) -> dict:
    body = {"prompt": prompt, "max_tokens": n_out, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens, error = [], None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")[:200]
                return {"error": f"HTTP {r.status_code}: {body}", "ttft": None, "gaps": [], "tokens": 0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if msg.get("usage"):
                    tokens = msg["usage"].get("completion_tokens")
                if msg.get("choices") and msg["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        error = f"{type(e).__name__}: {e}"[:200]
    if tokens is None:  # a server that sends no usage: ignore_eos made it generate every token asked for
        tokens = n_out if error is None else len(times)
    tpot = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None
    return {"error": error, "ttft": times[0] - t0 if times else None, "tpot": tpot,
            "gaps": [b - a for a, b in itertools.pairwise(times)], "tokens": tokens}


async def run_round(url: str, jobs: list, c: int, time_limit: float) -> dict:
    """C clients over `jobs` (closed loop); no request starts after `time_limit` s."""
    queue = list(enumerate(jobs))
    results = []
    start = time.perf_counter()

    async def client_loop(client):
        while queue and time.perf_counter() - start < time_limit:
            _, (prompt, n_out) = queue.pop(0)
            results.append(await one_request(client, url, prompt, n_out))

    # a new connection per request: llama-server closes idle keep-alive connections, and a request sent on one
    # that it just closed fails before reaching it (httpx RemoteProtocolError), which is not the server's error
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit + 120), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(c)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    return {"wall": wall, "requests": len(results), "errors": len(results) - len(ok),
            "tokens": sum(r["tokens"] for r in ok), "ttft": [r["ttft"] for r in ok if r["ttft"] is not None],
            "gaps": [g for r in ok for g in r["gaps"]], "tpot": [r["tpot"] for r in ok if r["tpot"] is not None],
            "load": load_avg(), "error_texts": sorted({r["error"] for r in results if r["error"]})}


def summarise(rounds: list[dict]) -> dict:
    ttft = [t for r in rounds for t in r["ttft"]]
    gaps = [g for r in rounds for g in r["gaps"]]
    tpot = [t for r in rounds for t in r["tpot"]]
    return {
        "tok_s": statistics.median(r["tokens"] / r["wall"] for r in rounds),
        "req_s": statistics.median(r["requests"] / r["wall"] for r in rounds),
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
        "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
        "requests": sum(r["requests"] for r in rounds), "errors": sum(r["errors"] for r in rounds),
        "load": rounds[-1]["load"], "error_texts": sorted(set().union(*(r["error_texts"] for r in rounds))),
    }


# -- the report ----------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.1f} ms"


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU"


COLUMNS = ("system", "C", "output tok/s", "req/s", "TTFT p50", "TTFT p99", "inter-token p50", "inter-token p99",
           "per token p50", "per token p99", "requests", "errors", "load avg")


def report(args, table: dict, argv: list[str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Serving load: {Path(args.checkpoint).name}" + (f" ({args.label})" if args.label else ""), ""]
    if args.label == "smoke":
        lines += [("**Smoke run**: a few requests on a small model with random weights, to show that the load "
                   "generator and the server work end to end. These numbers are not a target or a claim about "
                   "serving speed."), ""]
    load = (f"prompts of {args.prompt_len[0]}-{args.prompt_len[1]} random token ids, outputs of "
            f"{args.output_len[0]}-{args.output_len[1]} tokens (greedy, ignore_eos), streamed; up to "
            f"{args.requests} requests and {args.time_limit:.0f} s per round, {args.rounds} interleaved round(s)")
    lines += [f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs; servers at {args.threads} threads",
              f"- date: {now}", f"- command: `python {' '.join(argv)}`", f"- load: {load}", "",
              "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for (system, c), v in table.items():
        cells = [system, c, f"{v['tok_s']:.1f}", f"{v['req_s']:.2f}", *(ms(v[k]) for k in (
            "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "tpot_p50", "tpot_p99")), v["requests"], v["errors"],
            v["load"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", ("Inter-token: the gaps between streamed chunks as the client receives them (chunks that arrive "
                   "together give near-zero gaps). Per token: each request's (last chunk - first chunk) / "
                   "(tokens - 1)."),
              "", (f"memoryformer serve: one server with --max-batch {max(args.concurrency)} slots for every C (every "
                   "active slot a row of one compiled engine call per step; an idle slot costs nothing), --prefill-chunk "
                   f"{args.prefill_chunk}; llama-server: started for each C with -np C.")]
    ratios = [(c, v, table.get(("llama.cpp", c))) for (system, c), v in table.items() if system == "memoryformer"]
    if any(other for _, _, other in ratios):
        lines += ["", "| C | output tok/s, ours / llama.cpp | TTFT p99, ours / llama.cpp |", "|---|---|---|"]
        lines += [f"| {c} | {v['tok_s'] / o['tok_s']:.2f}x | {v['ttft_p99'] / o['ttft_p99']:.2f}x |"
                  for c, v, o in ratios if o]
    errors = [(system, c, e) for (system, c), v in table.items() for e in v.get("error_texts", [])]
    if errors:
        lines += ["", "Errors:"] + [f"- {system} C={c}: {e}" for system, c, e in errors]
    return "\n".join(lines) + "\n"


def span(text: str) -> tuple[int, int]:
    a, _, b = text.partition(":")
    lo, hi = int(a), int(b or a)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tables", default="int8")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client counts C")
    p.add_argument("--requests", type=int, default=64, help="requests per round at most (default 64)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per round after which no request starts")
    p.add_argument("--prompt-len", type=span, default=(32, 256))
    p.add_argument("--output-len", type=span, default=(64, 128))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefill-chunk", type=int, default=0, help="our server's --prefill-chunk (0: whole prompts)")
    p.add_argument("--spin-us", type=int, help="our server's --spin-us (default: its own)")
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary, to load the same way")
    p.add_argument("--gguf", metavar="FILE", help="the GGUF model llama-server serves")
    p.add_argument("--label", help="a word for the title and file name (smoke: marked as not a target figure)")
    p.add_argument("--save", action="store_true", help=f"write the markdown and json under {RESULTS}")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if bool(args.llama_server) != bool(args.gguf):
        p.error("--llama-server and --gguf go together")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = json.loads((Path(args.checkpoint) / "config.json").read_text())
    context, vocab = int(cfg["max_seq_len"]), min(int(cfg["vocab_size"]), 50_277)
    if args.prompt_len[1] + args.output_len[1] > context:
        raise SystemExit(f"--prompt-len / --output-len: {args.prompt_len[1]} + {args.output_len[1]} tokens exceed "
                         f"the checkpoint's max_seq_len of {context}")
    ours = start_ours(args, max(args.concurrency))
    table: dict = {}
    try:
        for c in args.concurrency:
            jobs = workload(args.requests, args.seed + c, args.prompt_len, args.output_len, vocab)
            systems = {"memoryformer": ours}
            if args.llama_server:
                systems["llama.cpp"] = start_llama(args, c, context)
            try:
                for proc in systems.values():  # warm up: threads, allocator, caches
                    asyncio.run(run_round(proc.url, jobs[:1], 1, args.time_limit))
                rounds = {name: [] for name in systems}
                for _ in range(args.rounds):
                    for name, proc in systems.items():
                        rounds[name].append(asyncio.run(run_round(proc.url, jobs, c, args.time_limit)))
                for name in systems:
                    table[(name, c)] = summarise(rounds[name])
                    s = table[(name, c)]
                    print(f"{name:12s} C={c:<3d} {s['tok_s']:8.1f} tok/s  {s['req_s']:6.2f} req/s  TTFT p50 "
                          f"{s['ttft_p50'] * 1e3:7.1f} ms  ITL p50 {s['itl_p50'] * 1e3:6.1f} ms  errors {s['errors']}",
                          flush=True)
                    for e in s["error_texts"]:
                        print(f"  error: {e}", flush=True)
            finally:
                if "llama.cpp" in systems:
                    systems["llama.cpp"].stop()
    finally:
        rc = ours.stop()
        print(f"memoryformer serve exited with {rc} after SIGTERM")
    text = report(args, table, [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    print(text)
    if args.save:
        day = datetime.date.today().isoformat()
        name = f"serve_{Path(args.checkpoint).name}{'_' + args.label if args.label else ''}_{day}"
        (RESULTS / f"{name}.md").write_text(text)
        rows = [{"system": s, "concurrency": c, **v} for (s, c), v in table.items()]
        (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {RESULTS / name}.md and .json")


if __name__ == "__main__":
    main()
