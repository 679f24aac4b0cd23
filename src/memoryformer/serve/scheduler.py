"""Continuous batching over a `SlotEngine`: requests join and leave the running batch at step boundaries.

One background thread runs the loop: (1) drop cancelled requests, freeing their slots; (2) admit waiting requests
first come, first served, while a slot is free: their prompt is prefilled whole (`prefill_chunk=0`) or joins the
next steps `prefill_chunk` tokens at a time; (3) one engine call for every active row's next token (and those
prompt chunks); rows that finished (a stop token, a stop string, max_tokens, the context) free their slot.
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
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from memoryformer.generate import sample_next
from memoryformer.ops import cpu_ext
from memoryformer.serve.engine import SlotEngine
from memoryformer.serve.metrics import Metrics
from memoryformer.serve.request import Event, Handle, SamplingParams, _int

log = logging.getLogger("memoryformer.serve")


class QueueFull(RuntimeError):
    """Every slot is busy and `max_queue` requests already wait."""


class ShuttingDown(RuntimeError):
    """The scheduler no longer admits requests."""


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
    anchor: int = 0  # ids[:anchor] decode to the first anchor_chars characters of `sent`
    anchor_chars: int = 0
    pending: int | None = None  # the last sampled token, fed at the next step
    last: float = 0.0
    fed: int = 0  # prompt tokens in the slot (chunked prefill: the rest go in with the next steps)


class Scheduler:
    """Continuous batching of requests over `engine` (see the module's docstring).

    decode: token ids -> text (needed for stop strings and text events; None: events carry ids and no text).
    eos_id: the end-of-text token that stops every request unless it sets `ignore_eos`.
    prefill_chunk: 0 prefills an admitted prompt whole, in a call of its own before the next step (the other rows
        wait for it); N > 0 sends up to N prompt tokens with each step, beside the running rows' next tokens
        (chunked prefill: a long prompt delays each step a little instead of one step a lot).
    """

    def __init__(self, engine: SlotEngine, *, max_queue: int = 64, decode: Callable[[list[int]], str] | None = None,
                 eos_id: int | None = None, metrics: Metrics | None = None, prefill_chunk: int = 0):
        self.engine, self.max_queue = engine, _int(max_queue, "max_queue", 0)
        self.prefill_chunk = _int(prefill_chunk, "prefill_chunk", 0)
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
        if self.engine.compiled:  # this thread's sampling on one torch thread (cpu_ext.torch_serial)
            with cpu_ext.torch_serial():
                return self._loop()
        return self._loop()

    def _loop(self) -> None:
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
            except Exception as e:
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
        if self.engine.length(row.slot):  # a row cancelled before its first prompt chunk never reached the engine
            self.engine.free(row.slot)
        with self._cond:
            self._free.append(row.slot)
        self.metrics.finish(last.finish_reason)
        row.handle._push(last)

    def _prefill(self, handle: Handle, slot: int) -> None:
        """Give `handle` its slot; its prompt goes in now (whole) or with the next steps (chunked)."""
        p = handle.params
        stop_ids = set(p.stop_token_ids) | ({self.eos_id} if self.eos_id is not None and not p.ignore_eos else set())
        room = self.engine.max_seq_len - len(handle.prompt_ids)  # prompt + sampled tokens fit the slot's context
        try:
            gen = None
            if p.temperature > 0:
                gen = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            row = _Row(handle, slot, min(p.max_tokens, room), frozenset(stop_ids), gen)
            logits = None if self.prefill_chunk else self.engine.add(slot, handle.prompt_ids)
        except Exception as e:  # one bad request must not stop the others
            log.exception("prefill of request %d failed", handle.id)
            with self._cond:
                self._free.append(slot)
            self._finish_handle(handle, "error", f"prefill failed: {e}")
            return
        self._rows[slot] = row
        if logits is not None:
            row.fed = len(handle.prompt_ids)
            self.metrics.prompt(row.fed)
            self._accept([row], logits[None])

    def _step(self) -> None:
        """One engine call: the next token of every running row, and up to `prefill_chunk` prompt tokens of rows
        still filling (first admitted first)."""
        feeds, wants = [], []
        for r in self._rows.values():
            if r.pending is not None:
                feeds.append((r.slot, [r.pending], True))
                wants.append(r)
        budget = self.prefill_chunk
        for r in self._rows.values():
            prompt = r.handle.prompt_ids
            if budget <= 0 or r.fed >= len(prompt):
                continue
            chunk = prompt[r.fed:r.fed + budget]
            budget -= len(chunk)
            done = r.fed + len(chunk) == len(prompt)
            feeds.append((r.slot, chunk, done))
            if done:
                wants.append(r)
        if not feeds:
            return
        try:
            logits = self.engine.run(feeds)
        except Exception as e:  # the rows of this step end in an error; the server goes on
            log.exception("decode step failed")
            for slot, _, _ in feeds:
                self._release(self._rows[slot], Event("", [], "error", f"decode step failed: {e}"))
            return
        for slot, chunk, _ in feeds:
            row = self._rows[slot]
            if row.pending is None:
                row.fed += len(chunk)
                if row.fed == len(row.handle.prompt_ids):
                    self.metrics.prompt(row.fed)
        self._accept(wants, logits)

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits (n, V), send what it adds, finish the rows that are done."""
        now = time.perf_counter()
        gaps = []
        greedy = logits.argmax(-1).tolist()  # one call for every row; the sampled rows draw their own below
        for row, lg, best in zip(rows, logits, greedy):
            p, h = row.handle.params, row.handle
            tok = best if p.temperature == 0 else int(sample_next(lg[None], p.temperature, p.top_k, p.top_p,
                                                                  row.generator)[0, 0])
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
        string, and an incomplete UTF-8 character at the end, wait for the next token (unless `final`). Only the
        tokens after the last point where everything decoded had been sent are decoded again (`row.anchor`), so a
        step costs the same at any length."""
        if self.decode is None:
            return "", None
        tail = self.decode(row.ids[row.anchor:])  # the text after the first row.anchor_chars characters
        start = len(row.sent) - row.anchor_chars
        stops = row.handle.params.stop
        if stops:
            hits = [i for i in (tail.find(s, max(0, start - len(s) + 1)) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                new = tail[start:cut] if cut > start else ""
                row.sent += new
                return new, "stop"
        end = len(tail)
        if not final:
            while end > start and tail[end - 1] == "\ufffd":
                end -= 1
            hold = max((k for s in stops for k in range(1, len(s)) if tail[:end].endswith(s[:k])), default=0)
            end = max(start, end - hold)
        new = tail[start:end]
        row.sent += new
        if end == len(tail):  # all sent: later tokens decode on their own
            row.anchor, row.anchor_chars = len(row.ids), len(row.sent)
        return new, None
