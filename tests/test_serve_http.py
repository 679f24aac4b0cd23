"""`memoryformer serve` over HTTP, driven by the official `openai` client (httpx for malformed bodies): a server on
127.0.0.1 at a free port, in a thread, over a tiny random int8 MemoryFormer saved and loaded as a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import memoryformer as mf
from memoryformer.data import EOT_ID, decode, encode
from memoryformer.serve import Scheduler, slot_engine_for
from memoryformer.serve.app import build_app
from memoryformer.serve.engine import EagerSlots

CONTEXT = 64
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    ck = tmp_path_factory.mktemp("serve") / "tiny"
    mf.save_model(mf.build_model(mf.get_config("micro", n_layer=1, d_model=32, n_head=2, max_seq_len=CONTEXT)), ck)
    return ck


@pytest.fixture(scope="module")
def model(checkpoint):
    return mf.load(checkpoint, tables="int8")


class Server:
    """uvicorn in a thread on 127.0.0.1, port chosen by the OS; `close()` shuts it down (and drains)."""

    def __init__(self, engine, *, max_queue=16, api_key=None):
        self.scheduler = Scheduler(engine, max_queue=max_queue, decode=decode, eos_id=EOT_ID).start()
        app = build_app(self.scheduler, model_name="tiny", encode=encode, api_key=api_key, drain_timeout=2)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key="none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module")
def server(model):
    s = Server(slot_engine_for(model, 4))
    yield s
    s.close()


class Slow(EagerSlots):
    """Eager slots whose steps take `delay` s, or wait for `gate` when one is set up."""

    def __init__(self, model, max_batch, delay=0.05):
        super().__init__(model, max_batch)
        self.delay, self.gate = delay, None

    def run(self, feeds):
        if any(self._active[f[0]] for f in feeds):  # a step of running rows (not a first prefill)
            if self.gate is not None:
                assert self.gate.wait(20)
            time.sleep(self.delay)
        return super().run(feeds)


def complete(client, prompt, **kw):
    r = client.completions.create(model="tiny", prompt=prompt, **kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage


def test_completion_models_and_token_prompts(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    text, reason, usage = complete(client, "Hello world", max_tokens=8, temperature=0)
    assert reason == "length" and isinstance(text, str) and text
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, 8, 10)
    assert complete(client, encode("Hello world"), max_tokens=8, temperature=0)[0] == text  # token ids
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_streaming_adds_up_to_the_completion(server):
    client = server.client()
    text = complete(client, "Once upon a time", max_tokens=12, temperature=0)[0]
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stop_strings_streamed_or_not(server):
    client = server.client()
    text = complete(client, "The river", max_tokens=20, temperature=0)[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    want = text[: text.find(stop)]
    assert complete(client, "The river", max_tokens=20, temperature=0, stop=[stop, "\x00"])[:2] == (want, "stop")
    stream = client.completions.create(model="tiny", prompt="The river", max_tokens=20, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == want


def test_concurrent_requests_equal_the_same_prompts_alone(server):
    client = server.client()
    jobs = [("a", {"max_tokens": 10, "temperature": 0}),
            ("A longer prompt of a few more words than the first one", {"max_tokens": 6, "temperature": 0}),
            ("Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", {"max_tokens": 14, "temperature": 0}),
            ("Sampled", {"max_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 3}),
            ("Sampled too", {"max_tokens": 7, "temperature": 1.2, "seed": 11}),
            ("x y z", {"max_tokens": 12, "temperature": 0})]  # six requests, four slots: two wait their turn
    alone = [complete(client, p, **kw) for p, kw in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(server.client(), job[0], **job[1]), jobs))
    assert [(t, r) for t, r, _ in together] == [(t, r) for t, r, _ in alone]


def wait_for(cond, timeout=5.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_leaves_frees_its_slot(model):
    s = Server(Slow(model, 2, delay=0.1))
    try:
        stream = s.client().completions.create(model="tiny", prompt="Hello", max_tokens=60, temperature=0, stream=True)
        next(iter(stream))
        stream.close()  # 60 tokens would take 6 s
        wait_for(lambda: s.scheduler.metrics.finished.get("cancelled") == 1 and s.scheduler.active == 0, 2.0)
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices the closed connection too
            httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 60}, timeout=1.0)
        wait_for(lambda: s.scheduler.metrics.finished.get("cancelled") == 2 and s.scheduler.active == 0, 3.0)
    finally:
        s.close()


def test_the_drain_deadline_answers_what_is_left(model):
    s = Server(Slow(model, 2, delay=0.1))
    try:
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(httpx.post, f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 60},
                                timeout=30)
            with httpx.stream("POST", f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 60,
                                                                       "stream": True}, timeout=30) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                wait_for(lambda: s.scheduler.active == 2)
                s.scheduler.drain(0.2)  # as SIGTERM does: 60 tokens would take 6 s
                events = [line for line in lines if line]
            assert events[-1] == "data: [DONE]" and "shut down before this request finished" in events[-2]
            assert plain.result().status_code == 503 and plain.result().json()["error"]["code"] == "cancelled"
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "late"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{s.url}/health").status_code == 503
    finally:
        s.close()


def test_a_full_queue_answers_503_with_retry_after(model):
    engine = Slow(model, 1, delay=0)
    engine.gate = threading.Event()
    s = Server(engine, max_queue=1)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(complete, s.client(), "one", max_tokens=3, temperature=0)
            wait_for(lambda: s.scheduler.active == 1)
            second = pool.submit(complete, s.client(), "two", max_tokens=3, temperature=0)
            wait_for(lambda: s.scheduler.queue_depth == 1)
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "three"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.APIStatusError) as e:
                complete(s.client(), "three")
            assert e.value.status_code == 503
            engine.gate.set()
            assert first.result()[1] == second.result()[1] == "length"
        assert "memoryformer_serve_rejected_total 2" in httpx.get(f"{s.url}/metrics").text
    finally:
        engine.gate.set()
        s.close()


def test_api_key(model):
    s = Server(EagerSlots(model, 1), api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        for path in ("/health", "/v1/models", "/metrics"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert complete(s.client("sekrit"), "hi", max_tokens=2)[1] == "length"
    finally:
        s.close()


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (["a list"], 400, None),
    ({}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": [1, 60000]}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "seed": -2}, 400, "seed"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ({"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    ({"prompt": list(range(CONTEXT))}, 413, "prompt"),
])
def test_bad_requests_name_the_field(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param or "body")


def test_chat_without_a_template_and_unknown_routes(server):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    r = httpx.get(f"{server.url}/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_metrics_count_requests_and_latencies(server):
    complete(server.client(), "count me", max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["memoryformer_serve_queue_depth"] == 0 and values["memoryformer_serve_max_slots"] == 4
    assert values["memoryformer_serve_generated_tokens_total"] >= 4
    assert values["memoryformer_serve_time_to_first_token_seconds_count"] >= 1
    assert values['memoryformer_serve_inter_token_seconds_bucket{le="+Inf"}'] >= 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a process of its own: 10-20 s to import torch and load on a loaded 2-core machine
def test_sigterm_drains_and_exits_zero(checkpoint):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "memoryformer", "serve", "--checkpoint", str(checkpoint),
                             "--tables", "int8", "--port", str(port), "--drain-timeout", "20", "--no-verify"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "no start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 60, "stream": True,
                                                                 "temperature": 0}, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # in flight: the request still finishes
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_missing_extra_is_one_line(monkeypatch, capsys):
    from memoryformer.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "memoryformer.serve.app")
    monkeypatch.delattr(sys.modules["memoryformer.serve"], "app")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--checkpoint", "nowhere"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "pip install 'memoryformer[serve]'" in err
