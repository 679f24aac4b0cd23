"""Serving soak: C streaming clients against `memoryformer serve` for a fixed time, some of them hanging up mid-stream,
on 127.0.0.1 only; it stops by itself.

    python benchmarks/serve_soak.py --checkpoint CKPT --tables int8 --clients 16 --minutes 10 --save

Each client sends requests back to back: a prompt of seeded random token ids (length uniform in --prompt-len), an
output length uniform in --output-len, greedy or sampled (temperature 0.8, top_p 0.95, a seed) at random, streamed.
With probability --disconnect a client closes the connection after a random number of streamed chunks (a client
that goes away) and goes on with its next request. The server's resident memory (VmRSS of its process) is sampled
every few seconds. It passes when:
- no request failed other than the ones the client itself hung up on (HTTP errors, broken streams, short outputs);
- RSS after the warm-up (the first 10 % of the time) grew by less than 5 % peak to peak;
- at the end /metrics shows no active slot and an empty queue, and the server exits 0 after SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import HOST, RESULTS, Process, cpu_name, free_port, load_avg, span  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def one(client: httpx.AsyncClient, url: str, rng: random.Random, args, stats: dict) -> None:
    prompt = [rng.randrange(1000, 50_000) for _ in range(rng.randint(*args.prompt_len))]
    n_out = rng.randint(*args.output_len)
    body = {"prompt": prompt, "max_tokens": n_out, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if rng.random() < 0.5:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
    else:
        body.update(temperature=0)
    leave_after = rng.randint(1, n_out) if rng.random() < args.disconnect else None
    chunks, usage = 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                stats["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if msg.get("usage"):
                    usage = msg["usage"]["completion_tokens"]
                if msg.get("choices"):
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        stats["disconnects"] += 1
                        return  # leaving the block closes the connection mid-stream
        if usage != n_out:
            stats["errors"].append(f"completion_tokens {usage}, asked for {n_out}")
        else:
            stats["completed"] += 1
            stats["tokens"] += usage
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        stats["errors"].append(f"{type(e).__name__}: {e}"[:200])


async def soak(url: str, pid: int, args) -> dict:
    stats = {"completed": 0, "disconnects": 0, "tokens": 0, "errors": [], "rss": []}
    start = time.perf_counter()
    end = start + 60 * args.minutes

    async def client_loop(i: int, client: httpx.AsyncClient):
        rng = random.Random(args.seed * 1000 + i)
        while time.perf_counter() < end:
            await one(client, url, rng, args, stats)

    async def sampler():
        while time.perf_counter() < end:
            stats["rss"].append((round(time.perf_counter() - start, 1), rss(pid)))
            await asyncio.sleep(args.sample_every)

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        await asyncio.gather(sampler(), *(client_loop(i, client) for i in range(args.clients)))
    stats["seconds"] = time.perf_counter() - start
    await asyncio.sleep(1.0)  # the server frees the last disconnected slots at its next step boundary
    async with httpx.AsyncClient() as client:
        page = (await client.get(url + "/metrics")).text
    stats["active_slots"] = metric(page, "memoryformer_serve_active_slots")
    stats["queue_depth"] = metric(page, "memoryformer_serve_queue_depth")
    stats["rss"].append((round(time.perf_counter() - start, 1), rss(pid)))
    return stats


def verdict(stats: dict, warm: float) -> tuple[bool, dict]:
    after = [b for t, b in stats["rss"] if t >= warm]
    growth = (max(after) - min(after)) / min(after) if after else float("nan")
    checks = {"no errors besides disconnects": not stats["errors"],
              "RSS after warm-up within 5 % peak to peak": growth < 0.05,
              "every slot free at the end": stats["active_slots"] == 0 and stats["queue_depth"] == 0,
              "exit 0 after SIGTERM": stats["exit_code"] == 0}
    return all(checks.values()), {"checks": checks, "rss_growth": growth}


def report(args, stats: dict, ok: bool, v: dict, argv: list[str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mb = [b / 2**20 for _, b in stats["rss"]]
    lines = [f"# Serving soak: {Path(args.checkpoint).name}, {args.clients} clients, {args.minutes:g} min — "
             f"{'PASS' if ok else 'FAIL'}", "",
             f"- machine: {cpu_name()}; server at {args.threads} threads, --max-batch {args.clients}",
             f"- date: {now}; load average at the end {load_avg()}", f"- command: `python {' '.join(argv)}`",
             f"- requests: prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs "
             f"{args.output_len[0]}-{args.output_len[1]}, half greedy, half sampled; a client hangs up mid-stream "
             f"with probability {args.disconnect}", "",
             "| completed | disconnects | other errors | output tokens | output tok/s | RSS first / min / max / last "
             "(MB) | RSS growth after warm-up | active slots, queue at the end | exit code |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {stats['completed']} | {stats['disconnects']} | {len(stats['errors'])} | {stats['tokens']} | "
             f"{stats['tokens'] / stats['seconds']:.1f} | {mb[0]:.0f} / {min(mb):.0f} / {max(mb):.0f} / {mb[-1]:.0f} | "
             f"{100 * v['rss_growth']:.2f} % | {stats['active_slots']:.0f}, {stats['queue_depth']:.0f} | "
             f"{stats['exit_code']} |", ""]
    lines += [f"- {'ok' if good else 'FAILED'}: {name}" for name, good in v["checks"].items()]
    lines += [f"- error: {e}" for e in sorted(set(stats["errors"]))[:10]]
    lines += ["", "RSS samples (s, MB): " + ", ".join(f"{t:.0f}: {b / 2**20:.0f}" for t, b in stats["rss"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tables", default="int8")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--disconnect", type=float, default=0.2, help="probability a client hangs up mid-stream")
    ap.add_argument("--prompt-len", type=span, default=(32, 256))
    ap.add_argument("--output-len", type=span, default=(64, 128))
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", action="store_true", help=f"write serve_soak_<checkpoint>_<date>.md/.json under {RESULTS}")
    args = ap.parse_args(argv)
    port = free_port()
    cmd = [sys.executable, "-m", "memoryformer", "serve", "--checkpoint", args.checkpoint, "--host", HOST,
           "--port", str(port), "--max-batch", str(args.clients), "--threads", str(args.threads), "--no-verify"]
    if args.tables:
        cmd += ["--tables", args.tables]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    server = Process("memoryformer", cmd, port, "/health", env=env)
    try:
        stats = asyncio.run(soak(server.url, server.proc.pid, args))
    finally:
        stats_exit = server.stop()
    stats["exit_code"] = stats_exit
    ok, v = verdict(stats, warm=0.1 * 60 * args.minutes)
    text = report(args, stats, ok, v, [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    print(text)
    if args.save:
        name = f"serve_soak_{Path(args.checkpoint).name}_{datetime.date.today().isoformat()}"
        (RESULTS / f"{name}.md").write_text(text)
        (RESULTS / f"{name}.json").write_text(json.dumps({**stats, **v, "pass": ok}, indent=1, default=str) + "\n")
        print(f"wrote {RESULTS / name}.md and .json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
