"""Continuous batching over a `SlotEngine`: requests join and leave the running batch at step boundaries.

One background thread runs the loop: (1) drop cancelled requests, freeing their slots; (2) admit waiting requests
first come, first served, while a slot is free: their prompt is prefilled and their first token sampled; (3) one
step of every active row; rows that finished (a stop token, a stop string, max_tokens, the context) free their slot.
The queue of waiting requests is bounded (`QueueFull` past `max_queue`). Each row is sampled with its own
`torch.Generator`, so a seeded request gives the same text alone or beside others.

    sched = Scheduler(slot_engine_for(model, 8), decode=data.decode, eos_id=data.EOT_ID).start()
    handle = sched.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    text, reason, usage = handle.result()         # or: for ev in handle: ... / async for ev in handle.aiter(): ...
    sched.shutdown(deadline=30)                    # stop admitting, let rows finish, cancel what is left, join
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from memoryformer.generate import sample_next
from memoryformer.serve.engine import SlotEngine
from memoryformer.serve.metrics import Metrics

log = logging.getLogger("memoryformer.serve")
MAX_STOP = 4  # stop strings per request, as OpenAI's API


class QueueFull(RuntimeError):
    """Every slot is busy and `max_queue` requests already wait."""


class ShuttingDown(RuntimeError):
    """The scheduler no longer admits requests."""


def _int(value, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; `stop` strings end the text before them; the scheduler's
    end-of-text token and `stop_token_ids` end it too (not part of the text)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        _int(self.max_tokens, "max_tokens", 1)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
            raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None:
            _int(self.top_k, "top_k", 1)
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1], got {p!r}")
        if self.seed is not None:
            _int(self.seed, "seed", 0)
        if len(self.stop) > MAX_STOP or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: expected up to {MAX_STOP} non-empty strings, got {list(self.stop)!r}")
        for tok in self.stop_token_ids:
            _int(tok, "stop_token_ids", 0)


@dataclass
class Event:
    """What a request produced since its last event: new text and token ids; `finish_reason` on the last one
    ("stop", "length", "cancelled" or "error", with `error` saying why)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


class Handle:
    """A submitted request: its events (iterate, `aiter()` in an event loop, or `result()`), `cancel()`."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, wake: Callable[[], None],
                 loop: asyncio.AbstractEventLoop | None):
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.arrival = time.perf_counter()
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self._wake, self._loop = wake, loop
        self._cond = threading.Condition()
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event() if loop is not None else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this request: its slot (or its place in the queue) is given up at the next step boundary."""
        if not self.done:
            self.cancelled = True
            self._wake()

    def _push(self, ev: Event) -> None:  # the scheduler's thread
        with self._cond:
            if ev.finish_reason is not None:
                self.finish_reason = ev.finish_reason
            self._events.append(ev)
            self._cond.notify_all()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

    def _take(self) -> list[Event]:
        with self._cond:
            out = list(self._events)
            self._events.clear()
            return out

    def __iter__(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._events)
            for ev in self._take():
                yield ev
                if ev.finish_reason is not None:
                    return

    async def aiter(self):
        """The events, from the event loop given to `submit`."""
        if self._ready is None:
            raise RuntimeError("aiter: submit this request with loop=asyncio.get_running_loop()")
        while True:
            await self._ready.wait()
            self._ready.clear()  # before taking: an event pushed after this sets it again
            for ev in self._take():
                yield ev
                if ev.finish_reason is not None:
                    return

    def result(self) -> tuple[str, str, dict]:
        """Block until done: (text, finish_reason, usage); RuntimeError if it ended in an error."""
        text = []
        for ev in self:
            text.append(ev.text)
            if ev.error:
                raise RuntimeError(ev.error)
        return "".join(text), self.finish_reason, self.usage

    @property
    def usage(self) -> dict:
        n, m = len(self.prompt_ids), self.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


@dataclass
class _Row:
    """A request in a slot: its generated ids, the text sent so far, its sampler."""

    handle: Handle
    slot: int
    limit: int  # tokens it may still sample in all: max_tokens, cut to the slot's context
    stop_ids: frozenset
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)  # sampled tokens that are text (no stop token)
    sent: str = ""
    pending: int | None = None  # the last sampled token, fed at the next step
    last: float = 0.0


class Scheduler:
    """Continuous batching of requests over `engine` (see the module's docstring).

    decode: token ids -> text (needed for stop strings and text events; None: events carry ids and no text).
    eos_id: the end-of-text token that stops every request unless it sets `ignore_eos`.
    """

    def __init__(self, engine: SlotEngine, *, max_queue: int = 64, decode: Callable[[list[int]], str] | None = None,
                 eos_id: int | None = None, metrics: Metrics | None = None):
        self.engine, self.max_queue = engine, _int(max_queue, "max_queue", 0)
        self.decode, self.eos_id = decode, eos_id
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._rows: dict[int, _Row] = {}
        self._free = list(range(engine.max_batch - 1, -1, -1))  # popped from the end: slot 0 first
        self._ids = itertools.count(1)
        self._admitting, self._stopped_at, self._drain_until = True, 0.0, None
        self._thread: threading.Thread | None = None

    # -- the clients' side ----------------------------------------------------------------------------------------

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="memoryformer-serve", daemon=True)
            self._thread.start()
        return self

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def admitting(self) -> bool:
        return self._admitting

    @property
    def alive(self) -> bool:
        """Is the thread that runs the steps running (False before `start` and after it stopped)?"""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request; ValueError for a bad prompt, `QueueFull`, `ShuttingDown`."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("prompt: empty (give at least one token)")
        if min(ids) < 0 or max(ids) >= self.engine.vocab_size:
            raise ValueError(f"prompt: token ids must lie in [0, {self.engine.vocab_size})")
        if len(ids) >= self.engine.max_seq_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room in the context of {self.engine.max_seq_len}")
        with self._cond:
            if not self._admitting:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue + len(self._free):  # neither a slot nor room in the queue
                self.metrics.reject()
                raise QueueFull(f"{len(self._waiting)} requests already wait for a slot (max_queue={self.max_queue})")
            handle = Handle(next(self._ids), ids, params, self._wake, loop)
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def stop_admitting(self) -> None:
        """Refuse new requests from now on (`ShuttingDown`); the deadline of `shutdown` counts from here."""
        with self._cond:
            if self._admitting:
                self._admitting, self._stopped_at = False, time.perf_counter()

    def drain(self, deadline: float = 30.0) -> None:
        """Stop admitting and return: the requests in flight (active and waiting) may finish until `deadline`
        seconds after admission stopped (`stop_admitting`, or now); then the rest are cancelled and the thread
        stops."""
        self.stop_admitting()
        with self._cond:
            until = self._stopped_at + max(0.0, deadline)
            self._drain_until = until if self._drain_until is None else min(until, self._drain_until)
            self._cond.notify_all()

    def shutdown(self, deadline: float = 30.0) -> None:
        """`drain(deadline)`, then wait for the thread to stop."""
        self.drain(deadline)
        if self._thread is not None:
            self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the loop -------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._reap()
                if self._drain_until is not None and (time.perf_counter() >= self._drain_until or
                                                      not (self._rows or self._waiting)):
                    self._cancel_all("the server shut down before this request finished")
                    return
                if not self._rows and not self._waiting:
                    self._cond.wait(timeout=0.5)
                    continue
                admitted = []
                while self._free and self._waiting:
                    admitted.append((self._waiting.popleft(), self._free.pop()))
            try:
                for handle, slot in admitted:
                    self._prefill(handle, slot)
                self._step()
            except Exception as e:  # noqa: BLE001 - the loop must outlive any one step: fail its rows, go on
                log.exception("scheduler step failed")
                with self._cond:
                    self._cancel_all(f"internal error: {type(e).__name__}: {e}", reason="error")

    def _reap(self) -> None:
        """Drop cancelled requests (under the lock): their slots return at once."""
        for h in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(h)
            self._finish_handle(h, "cancelled")
        for row in [r for r in self._rows.values() if r.handle.cancelled]:
            self._release(row, Event("", [], "cancelled"))

    def _cancel_all(self, why: str, reason: str = "cancelled") -> None:
        while self._waiting:
            self._finish_handle(self._waiting.popleft(), reason, why)
        for row in list(self._rows.values()):
            self._release(row, Event("", [], reason, why))

    def _finish_handle(self, handle: Handle, reason: str, error: str | None = None) -> None:
        self.metrics.finish(reason)
        handle._push(Event("", [], reason, error))

    def _release(self, row: _Row, last: Event) -> None:
        self._rows.pop(row.slot, None)
        self.engine.free(row.slot)
        with self._cond:
            self._free.append(row.slot)
        self.metrics.finish(last.finish_reason)
        row.handle._push(last)

    def _prefill(self, handle: Handle, slot: int) -> None:
        p = handle.params
        stop_ids = set(p.stop_token_ids) | ({self.eos_id} if self.eos_id is not None and not p.ignore_eos else set())
        room = self.engine.max_seq_len - len(handle.prompt_ids)  # prompt + sampled tokens fit the slot's context
        try:
            gen = None
            if p.temperature > 0:
                gen = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            row = _Row(handle, slot, min(p.max_tokens, room), frozenset(stop_ids), gen)
            logits = self.engine.add(slot, handle.prompt_ids)
        except Exception as e:  # one bad request must not stop the others
            log.exception("prefill of request %d failed", handle.id)
            with self._cond:
                self._free.append(slot)
            self._finish_handle(handle, "error", f"prefill failed: {e}")
            return
        self._rows[slot] = row
        self.metrics.prompt(len(handle.prompt_ids))
        self._accept([row], logits[None])

    def _step(self) -> None:
        rows = [r for r in self._rows.values() if r.pending is not None]
        if not rows:
            return
        try:
            logits = self.engine.step([r.slot for r in rows], [r.pending for r in rows])
        except Exception as e:  # the rows of this step end in an error; the server goes on
            log.exception("decode step failed")
            for r in rows:
                self._release(r, Event("", [], "error", f"decode step failed: {e}"))
            return
        self._accept(rows, logits)

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits (n, V), send what it adds, finish the rows that are done."""
        now = time.perf_counter()
        gaps = []
        for row, lg in zip(rows, logits):
            p, h = row.handle.params, row.handle
            tok = int(sample_next(lg[None], p.temperature, p.top_k, p.top_p, row.generator)[0, 0])
            h.completion_tokens += 1
            if h.completion_tokens == 1:
                self.metrics.first_token(now - h.arrival)
            else:
                gaps.append(now - row.last)
            row.last = now
            reason = None
            if tok in row.stop_ids:
                reason = "stop"
            else:
                row.ids.append(tok)
            text, stopped = self._text(row, final=reason is not None or h.completion_tokens >= row.limit)
            reason = reason or stopped or ("length" if h.completion_tokens >= row.limit else None)
            ev = Event(text, [] if tok in row.stop_ids else [tok], reason)
            if reason is None:
                row.pending = tok
                h._push(ev)
            else:
                self._release(row, ev)
        self.metrics.tokens(len(rows), gaps)

    def _text(self, row: _Row, final: bool) -> tuple[str, str | None]:
        """The text the row adds now and "stop" if a stop string ended it. Text that could still become a stop
        string, and an incomplete UTF-8 character at the end, wait for the next token (unless `final`)."""
        if self.decode is None:
            return "", None
        full = self.decode(row.ids)
        start = len(row.sent)
        stops = row.handle.params.stop
        if stops:
            hits = [i for i in (full.find(s, max(0, start - len(s) + 1)) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                new = full[start:cut] if cut > start else ""
                row.sent += new
                return new, "stop"
        end = len(full)
        if not final:
            while end > start and full[end - 1] == "\ufffd":
                end -= 1
            hold = max((k for s in stops for k in range(1, len(s)) if full[:end].endswith(s[:k])), default=0)
            end = max(start, end - hold)
        new = full[start:end]
        row.sent += new
        return new, None
