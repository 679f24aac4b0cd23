"""Slot engines: decoding state kept per row ("slot"), so rows of different lengths decode side by side.

A server holds `max_batch` slots. A request's prompt fills a free slot, every active slot then advances by one
token per step (all active rows in one call), and a finished row gives its slot back (`free`) while the others go
on. A slot that is not in a step costs nothing. `run` is the one primitive: it appends tokens to any slots, a
prompt's chunk beside the other rows' next tokens (chunked prefill), and returns the logits asked for.

    engine = slot_engine_for(model, max_batch=8)
    logits = engine.add(3, prompt_ids)            # (V,) logits of the prompt's last token; slot 3 holds the row
    logits = engine.step([3, 5], [tok3, tok5])     # (2, V): one token for each listed slot, at its own position
    logits = engine.run([(3, [tok3], True), (6, prompt[:64], False)])  # (1, V): a step beside a prompt's chunk
    engine.free(3)

`BatchedSlots` runs every slot as a row of one compiled `DecodeEngine` (`ops/csrc/engine.cpp`): a step, prompt
chunks included, is one call whatever the number of rows. `EagerSlots` (the eager model with a `KVCache` per slot,
for everything the engine cannot run) makes one call per row; the eager model is the reference the engine is
tested against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from memoryformer.inference import DecodeEngine, frozen
from memoryformer.model import KVCache

Feed = tuple[int, Sequence[int], bool]  # (slot, tokens appended to its row, want the logits of the last one)


class SlotEngine(ABC):
    """Per-row decoding state for up to `max_batch` rows, each at its own position (< `max_seq_len`)."""

    max_batch: int
    max_seq_len: int
    vocab_size: int
    compiled = False  # runs on the compiled kernels' thread pool (the caller keeps torch on one thread beside it)

    def __init__(self, max_batch: int, max_seq_len: int | None, cfg):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        S = cfg.max_seq_len if max_seq_len is None else int(max_seq_len)
        if not 1 <= S <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len: expected 1..{cfg.max_seq_len} (the model's), got {max_seq_len}")
        self.max_batch, self.max_seq_len, self.vocab_size = max_batch, S, cfg.vocab_size
        self._len = [0] * max_batch
        self._active = [False] * max_batch

    @abstractmethod
    def _forward(self, feeds: list[tuple[int, torch.Tensor, bool]], new: list[bool]) -> torch.Tensor:
        """The checked feeds (slot, (T,) int64 ids, want), new[i]: the slot starts a row -> (n_want, V) float32."""

    def run(self, feeds: Sequence[Feed]) -> torch.Tensor:
        """Append each feed's tokens to its slot's row (a free slot starts a new row; a slot appears once) and
        return the (n, V) float32 logits of the last token of each feed that wants them, in order."""
        feeds = list(feeds)
        slots = [f[0] for f in feeds]
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots: listed twice in {slots}")
        checked, new = [], []
        for slot, ids, want in feeds:
            self._slot(slot)
            checked.append((slot, self._ids(ids, self._len[slot]), bool(want)))
            new.append(not self._active[slot])
        if not checked:
            return torch.empty(0, self.vocab_size)
        with torch.inference_mode():
            logits = self._forward(checked, new)
        for slot, ids, _ in checked:
            self._active[slot] = True
            self._len[slot] += ids.numel()
        return logits

    def add(self, slot: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Start a row in free `slot` with its prompt; returns the (V,) float32 logits of the prompt's last token."""
        if self._active[self._slot(slot)]:
            raise ValueError(f"slot: {slot} is in use")
        return self.run([(slot, prompt_ids, True)])[0]

    def step(self, slots: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
        """Feed token ids[i] to row slots[i] (each at its own next position); returns (len(slots), V) logits."""
        slots = list(slots)
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).tolist()
        if len(slots) != len(ids):
            raise ValueError(f"ids: {len(ids)} tokens for {len(slots)} slots")
        for s in slots:
            if not self._active[self._slot(s)]:
                raise ValueError(f"slot: {s} is free")
        return self.run([(s, [t], True) for s, t in zip(slots, ids)])

    def free(self, slot: int) -> None:
        """Forget the row in `slot`; the slot can be given to a new prompt."""
        if not self._active[self._slot(slot)]:
            raise ValueError(f"slot: {slot} is free")
        self._active[slot], self._len[slot] = False, 0

    def length(self, slot: int) -> int:
        """Tokens the row in `slot` holds (0 for a free slot)."""
        return self._len[self._slot(slot)]

    @property
    def kind(self) -> str:
        return type(self).__name__

    def _slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot: expected an integer in [0, {self.max_batch}), got {slot!r}")
        return slot

    def _ids(self, ids: Sequence[int], n: int) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if t.numel() == 0:
            raise ValueError("prompt_ids: empty (a row starts with at least one token)")
        if int(t.min()) < 0 or int(t.max()) >= self.vocab_size:
            raise ValueError(f"ids: token ids must lie in [0, {self.vocab_size})")
        if n + t.numel() > self.max_seq_len:
            raise ValueError(f"max_seq_len: {n + t.numel()} positions exceed the slot's {self.max_seq_len}")
        return t


class BatchedSlots(SlotEngine):
    """Every slot a row of one compiled `DecodeEngine` of `max_batch` rows, each at its own position: a step (with
    any prompt chunks beside it) is one call; the LM head reads its weights once for all the rows."""

    compiled = True

    def __init__(self, model: nn.Module, max_batch: int = 16, *, max_seq_len: int | None = None,
                 kv_dtype: torch.dtype | None = None):
        super().__init__(max_batch, max_seq_len, model.config)
        self.model = model
        self.engine = DecodeEngine(model, batch_size=max_batch, max_seq_len=self.max_seq_len, kv_dtype=kv_dtype)

    def _forward(self, feeds, new):
        for (slot, _, _), fresh in zip(feeds, new):
            if fresh:
                self.engine.set_position(slot, 0)
        rows = torch.cat([torch.full((ids.numel(),), slot, dtype=torch.int64) for slot, ids, _ in feeds])
        ids = torch.cat([ids for _, ids, _ in feeds])
        ends = torch.tensor([ids.numel() for _, ids, _ in feeds]).cumsum(0) - 1
        last = torch.zeros(ids.numel(), dtype=torch.bool)
        last[ends[torch.tensor([want for _, _, want in feeds])]] = True
        return self.engine.feed(rows, ids, last)


class EagerSlots(SlotEngine):
    """The eager model with a batch-1 `KVCache` per slot (built on the slot's first use, kept): any softmax-attention
    model (dense Transformer, unfrozen MemoryFormer, a model on a GPU); the reference the engine is compared with."""

    def __init__(self, model: nn.Module, max_batch: int = 16, *, max_seq_len: int | None = None):
        if not model.supports_kv_cache():
            raise ValueError(f"model: attention {model.config.attention!r} has no KV-cached path to serve from")
        super().__init__(max_batch, max_seq_len, model.config)
        self.model, self.device = model, model.norm.weight.device
        self._caches: list[KVCache | None] = [None] * max_batch

    def _forward(self, feeds, new):
        out = []
        for (slot, ids, want), fresh in zip(feeds, new):
            if self._caches[slot] is None:
                self._caches[slot] = KVCache.for_model(self.model, 1, self.max_seq_len)
            if fresh:
                self._caches[slot].reset()
            hidden = self.model.hidden(ids[None].to(self.device), cache=self._caches[slot])
            if want:
                out.append(self.model.head(hidden[:, -1]).float().cpu()[0])
        return torch.stack(out) if out else torch.empty(0, self.vocab_size)


def slot_engine_for(model: nn.Module, max_batch: int = 16, *, engine: bool | None = None,
                    max_seq_len: int | None = None) -> SlotEngine:
    """The slot engine for `model`: `BatchedSlots` when the model is frozen for inference and the compiled engine
    runs it (engine=None), or always (True; an error if it cannot), else `EagerSlots` (or engine=False)."""
    model.eval()
    usable = frozen(model) and DecodeEngine.supports(model)  # the choice generate() makes
    if engine and not DecodeEngine.supports(model):
        why = DecodeEngine.why_not(model) or "the compiled CPU kernels are unavailable"
        raise ValueError(f"engine: the decode engine cannot run this model ({why})")
    if engine or (engine is None and usable):
        return BatchedSlots(model, max_batch, max_seq_len=max_seq_len)
    return EagerSlots(model, max_batch, max_seq_len=max_seq_len)
