"""Slot engines: decoding state kept per row ("slot"), so rows of different lengths decode side by side.

A server holds `max_batch` slots. A request's prompt fills a free slot (`add`), every active slot then advances by
one token per step (`step`, all active rows in one call), and a finished row gives its slot back (`free`) while the
others go on. A slot that is not in a step's `slots` costs nothing.

    engine = slot_engine_for(model, max_batch=8)
    logits = engine.add(3, prompt_ids)            # (V,) logits of the prompt's last token; slot 3 holds the row
    logits = engine.step([3, 5], [tok3, tok5])     # (2, V): one token for each listed slot, at its own position
    engine.free(3)

`SlotEngine` is the interface; the implementations here keep one batch-1 decoder per slot (`EngineSlots`: the
compiled `DecodeEngine`, for MemoryFormers frozen for inference; `EagerSlots`: the eager model with its own
`KVCache`, for everything else), so a step is one call per active row. A batched engine that takes every row at its
own position in one call implements the same four members and drops in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn as nn

from memoryformer.inference import DecodeEngine, frozen
from memoryformer.model import KVCache


class SlotEngine(ABC):
    """Per-row decoding state for up to `max_batch` rows, each at its own position (< `max_seq_len`)."""

    max_batch: int
    max_seq_len: int
    vocab_size: int

    @abstractmethod
    def add(self, slot: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Start a row in free `slot` with its prompt; returns the (V,) float32 logits of the prompt's last token."""

    @abstractmethod
    def step(self, slots: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
        """Feed token ids[i] to row slots[i] (each at its own next position); returns (len(slots), V) logits."""

    @abstractmethod
    def free(self, slot: int) -> None:
        """Forget the row in `slot`; the slot can be given to a new prompt."""

    @abstractmethod
    def length(self, slot: int) -> int:
        """Tokens the row in `slot` holds (0 for a free slot)."""

    @property
    def kind(self) -> str:
        return type(self).__name__


class _PerSlot(SlotEngine):
    """One batch-1 decoder per slot, built on a slot's first use and kept (its cache is preallocated once)."""

    def __init__(self, model: nn.Module, max_batch: int, max_seq_len: int | None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        cfg = model.config
        S = cfg.max_seq_len if max_seq_len is None else int(max_seq_len)
        if not 1 <= S <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len: expected 1..{cfg.max_seq_len} (the model's), got {max_seq_len}")
        self.model, self.max_batch, self.max_seq_len, self.vocab_size = model, max_batch, S, cfg.vocab_size
        self._rows: list = [None] * max_batch
        self._len = [0] * max_batch
        self._active = [False] * max_batch

    def _slot(self, slot: int, active: bool) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot: expected an integer in [0, {self.max_batch}), got {slot!r}")
        if self._active[slot] != active:
            raise ValueError(f"slot: {slot} is {'free' if active else 'in use'}")
        return slot

    def _ids(self, ids: Sequence[int], n: int) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.int64).reshape(1, -1)
        if t.shape[1] == 0:
            raise ValueError("prompt_ids: empty (a row starts with at least one token)")
        if int(t.min()) < 0 or int(t.max()) >= self.vocab_size:
            raise ValueError(f"ids: token ids must lie in [0, {self.vocab_size})")
        if n + t.shape[1] > self.max_seq_len:
            raise ValueError(f"max_seq_len: {n + t.shape[1]} positions exceed the slot's {self.max_seq_len}")
        return t

    @torch.inference_mode()
    def add(self, slot: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        slot = self._slot(slot, active=False)
        ids = self._ids(prompt_ids, 0)
        if self._rows[slot] is None:
            self._rows[slot] = self._new_row()
        logits = self._prefill(self._rows[slot], ids)
        self._active[slot], self._len[slot] = True, ids.shape[1]
        return logits[0].float()

    @torch.inference_mode()
    def step(self, slots: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
        slots = list(slots)
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if len(slots) != ids.numel():
            raise ValueError(f"ids: {ids.numel()} tokens for {len(slots)} slots")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots: listed twice in {slots}")
        out = []
        for s, tok in zip(slots, ids.tolist()):
            self._slot(s, active=True)
            t = self._ids([tok], self._len[s])
            out.append(self._advance(self._rows[s], t)[0].float())
            self._len[s] += 1
        if not out:
            return torch.empty(0, self.vocab_size)
        return torch.stack(out)

    def free(self, slot: int) -> None:
        slot = self._slot(slot, active=True)
        self._active[slot], self._len[slot] = False, 0

    def length(self, slot: int) -> int:
        return self._len[slot]

    def _new_row(self):
        raise NotImplementedError

    def _prefill(self, row, ids: torch.Tensor) -> torch.Tensor:  # (1, T) -> (1, V), starting the row anew
        raise NotImplementedError

    def _advance(self, row, ids: torch.Tensor) -> torch.Tensor:  # (1, 1) -> (1, V)
        raise NotImplementedError


class EngineSlots(_PerSlot):
    """A batch-1 `DecodeEngine` per slot over one frozen MemoryFormer: the engines read the model's tensors (no
    copy), each owns only its KV cache (n_layer, 1, n_head, max_seq_len, head_dim)."""

    def __init__(self, model: nn.Module, max_batch: int = 16, *, max_seq_len: int | None = None,
                 kv_dtype: torch.dtype | None = None):
        super().__init__(model, max_batch, max_seq_len)
        self.kv_dtype = kv_dtype
        self._rows[0] = self._new_row()  # fails here, not at the first request, if the engine cannot run the model

    def _new_row(self) -> DecodeEngine:
        return DecodeEngine(self.model, batch_size=1, max_seq_len=self.max_seq_len, kv_dtype=self.kv_dtype)

    def _prefill(self, row: DecodeEngine, ids: torch.Tensor) -> torch.Tensor:
        return row.prefill(ids)

    def _advance(self, row: DecodeEngine, ids: torch.Tensor) -> torch.Tensor:
        return row.step(ids[:, 0])


class EagerSlots(_PerSlot):
    """The eager model with a batch-1 `KVCache` per slot: any softmax-attention model (dense Transformer, unfrozen
    MemoryFormer, a model on a GPU); the reference the engine is compared with."""

    def __init__(self, model: nn.Module, max_batch: int = 16, *, max_seq_len: int | None = None):
        if not model.supports_kv_cache():
            raise ValueError(f"model: attention {model.config.attention!r} has no KV-cached path to serve from")
        super().__init__(model, max_batch, max_seq_len)
        self.device = model.norm.weight.device

    def _new_row(self) -> KVCache:
        return KVCache.for_model(self.model, 1, self.max_seq_len)

    def _prefill(self, row: KVCache, ids: torch.Tensor) -> torch.Tensor:
        row.reset()
        return self._advance(row, ids)

    def _advance(self, row: KVCache, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden(ids.to(self.device), cache=row)
        return self.model.head(hidden[:, -1]).float().cpu()


def slot_engine_for(model: nn.Module, max_batch: int = 16, *, engine: bool | None = None,
                    max_seq_len: int | None = None) -> SlotEngine:
    """The slot engine for `model`: `EngineSlots` when the model is frozen for inference and the compiled engine
    runs it (engine=None), or always (True; an error if it cannot), else `EagerSlots` (or engine=False)."""
    model.eval()
    usable = frozen(model) and DecodeEngine.supports(model)  # the choice generate() makes
    if engine and not DecodeEngine.supports(model):
        why = DecodeEngine.why_not(model) or "the compiled CPU kernels are unavailable"
        raise ValueError(f"engine: the decode engine cannot run this model ({why})")
    if engine or (engine is None and usable):
        return EngineSlots(model, max_batch, max_seq_len=max_seq_len)
    return EagerSlots(model, max_batch, max_seq_len=max_seq_len)
