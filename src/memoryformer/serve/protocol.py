"""The OpenAI completions protocol: a request body checked field by field, the response and stream chunk shapes.

No web framework here: `parse_completion` takes the decoded JSON body and raises `ApiError` (HTTP status, one
line naming the field, the field) for anything it cannot serve.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from memoryformer.serve.request import MAX_STOP, SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(param: str, expected: str, got) -> ApiError:
    return ApiError(400, f"{param}: expected {expected}, got {got!r}"[:300], param)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > hi or v < lo or (lo_open and v == lo):
        bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi < math.inf else f">= {lo:g}"
        raise _bad(name, f"a number {'in ' if hi < math.inf else ''}{bounds}", v)
    return v


def _optional_int(body: dict, name: str, lo: int, default=None, disabled: tuple = (), hi: int | None = None):
    v = body.get(name)
    if v is None or (v in disabled and _is_int(v)):
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise _bad(name, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""), v)
    return v


@dataclass
class CompletionRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


# fields of OpenAI's API this server does not implement, with the one value each may take
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logprobs": None, "presence_penalty": 0,
               "frequency_penalty": 0}


def _prompt_ids(body: dict, encode, vocab_size: int, max_seq_len: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        ids = encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = list(prompt)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "prompt: one prompt per request (send several requests: they are batched)", "prompt")
    else:
        raise _bad("prompt", "a string or a list of token ids", prompt)
    if not ids:
        raise ApiError(400, "prompt: empty (give at least one token of text to continue)", "prompt")
    if len(ids) >= max_seq_len:
        raise ApiError(413, f"prompt: {len(ids)} tokens, the model's context holds {max_seq_len} (the prompt must "
                       "leave room for at least one new token)", "prompt", code="context_length_exceeded")
    return ids


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or any(not isinstance(s, str) or not s for s in stops):
        raise _bad("stop", f"a non-empty string or a list of up to {MAX_STOP} of them", stop)
    return tuple(stops)


def parse_completion(body, *, encode, vocab_size: int, max_seq_len: int) -> CompletionRequest:
    """A /v1/completions body -> what the scheduler needs; `ApiError` naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}")
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in (None, allowed):
            raise ApiError(400, f"{name}: only {allowed!r} is supported by this server, got {body[name]!r}", name)
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias: not supported by this server", "logit_bias")
    ids = _prompt_ids(body, encode, vocab_size, max_seq_len)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "true or false", stream)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise _bad("stream_options", 'an object such as {"include_usage": true}', opts)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or any(not _is_int(t) or not 0 <= t < vocab_size for t in stop_ids):
        raise _bad("stop_token_ids", f"a list of token ids in [0, {vocab_size})", stop_ids)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "true or false", ignore_eos)
    params = SamplingParams(
        max_tokens=_optional_int(body, "max_tokens", 1, DEFAULT_MAX_TOKENS),
        temperature=_number(body, "temperature", 1.0, 0.0, math.inf),
        top_p=_number(body, "top_p", None, 0.0, 1.0, lo_open=True),
        top_k=_optional_int(body, "top_k", 1, None, disabled=(-1, 0)),
        seed=_optional_int(body, "seed", 0, hi=2**63 - 1),  # what a torch.Generator takes
        stop=_stops(body), stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos,
    )
    return CompletionRequest(ids, params, stream, bool(opts.get("include_usage", False)))


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None, usage: dict | None = None,
          with_usage: bool = False) -> dict:
    """A /v1/completions response (or, for a stream, one chunk of it)."""
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
    if usage is not None or with_usage:
        out["usage"] = usage
    return out


def usage_chunk(rid: str, model: str, created: int, usage: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage}


def model_list(model: str, max_seq_len: int, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "memoryformer", "max_model_len": max_seq_len}]}
