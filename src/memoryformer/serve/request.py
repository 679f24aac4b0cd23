"""A request as the scheduler sees it: how it samples (`SamplingParams`), what it produces (`Event`) and the handle
its client holds (`Handle`: iterate, `aiter()` in an event loop, `result()`, `cancel()`)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_STOP = 4  # stop strings per request, as OpenAI's API


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
