"""Serving a model over HTTP: slot engines (per-row decoding state), continuous batching, an OpenAI-style API.

- `engine`: `SlotEngine` (add / step / free over `max_batch` slots, each row at its own position) and its
  implementations over the compiled `DecodeEngine` (one per slot) and the eager model (one `KVCache` per slot).
- `scheduler`: `Scheduler`, continuous batching with a bounded FIFO queue, per-request sampling and cancellation.
- `protocol`: the /v1/completions request checks and response shapes.
- `app`: the FastAPI app and its uvicorn server (the optional extra `serve`; imported only by `memoryformer serve`).
"""

from memoryformer.serve.engine import EagerSlots, EngineSlots, SlotEngine, slot_engine_for
from memoryformer.serve.scheduler import Event, Handle, QueueFull, SamplingParams, Scheduler, ShuttingDown

__all__ = ["EagerSlots", "EngineSlots", "Event", "Handle", "QueueFull", "SamplingParams", "Scheduler",
           "ShuttingDown", "SlotEngine", "slot_engine_for"]
