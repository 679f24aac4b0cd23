"""Serving a model over HTTP: slot engines (per-row decoding state), continuous batching, an OpenAI-style API.

- `engine`: `SlotEngine` (run / add / step / free over `max_batch` slots, each row at its own position) and its
  implementations: `BatchedSlots` (every slot a row of one compiled `DecodeEngine`, a step one call) and
  `EagerSlots` (the eager model, one `KVCache` per slot).
- `scheduler`: `Scheduler`, continuous batching with a bounded FIFO queue, per-request sampling and cancellation.
- `protocol`: the /v1/completions request checks and response shapes.
- `app`: the FastAPI app and its uvicorn server (the optional extra `serve`; imported only by `memoryformer serve`).
"""

from memoryformer.serve.engine import BatchedSlots, EagerSlots, SlotEngine, slot_engine_for
from memoryformer.serve.request import Event, Handle, SamplingParams
from memoryformer.serve.scheduler import QueueFull, Scheduler, ShuttingDown

__all__ = ["BatchedSlots", "EagerSlots", "Event", "Handle", "QueueFull", "SamplingParams", "Scheduler",
           "ShuttingDown", "SlotEngine", "slot_engine_for"]
