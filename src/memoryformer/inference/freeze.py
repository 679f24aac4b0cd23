"""Freezing a model for inference: `freeze(model, tables=..., head=..., embedding=...)`, and the safetensors tags
that record what was frozen so that `memoryformer.load` rebuilds it the same way.

Every freeze goes through two primitives: `MemoryLayer.freeze` / `MemoryLayer.set_frozen` for the tables and
`freeze_rows` for the head and embedding, both converting with `memoryformer.ops.quant.to_storage`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memoryformer.config import DTYPES, HEAD_KEY, ROW_DTYPES, TABLES_KEY, MemoryFormerError
from memoryformer.inference.huge_pages import tables_to_huge_pages
from memoryformer.inference.quantized import QuantizedEmbedding, QuantizedLinear, freeze_rows, rows_of
from memoryformer.layers import MemoryLayer
from memoryformer.ops.int4 import INT4_GROUP, parse_int4_name
from memoryformer.ops.quant import dtype_name, torch_dtype


def default_head(tables: str | torch.dtype | None) -> str:
    """The head/embedding precision that goes with `tables`: int8 with int8 or int4, bfloat16 with bfloat16, else
    float32. int4 tables keep an int8 head and embedding: on a trained micro model an int4 head and embedding
    raise the val-PPL drift of int4 tables from +0.40 % to +1.24 % (benchmarks/results/quantization_int4_micro.md)
    while saving 35 MiB of MF-small's 1 GiB of int4 weights."""
    name = dtype_name(tables) if isinstance(tables, torch.dtype) else tables
    return "int8" if name == "int4" else name if name in ("int8", "bfloat16") else "float32"


@torch.no_grad()
def freeze(model: nn.Module, tables: str | torch.dtype | None = "int8", *, head: str | None = None,
           embedding: str | None = None, huge_pages: bool = True, group_size: int | None = INT4_GROUP) -> nn.Module:
    """Freeze `model` for inference, in place, and return it.

    tables: every Memory Layer's tables as "int8" (one float32 scale per row), "int4" (two values per byte, one
        float16 scale per `group_size` values), "bfloat16", "float16" or "float32" (`MemoryLayer.freeze`); outputs
        keep the dtype they had. None: the tables stay as they are.
    head: the LM head as "int8" (one scale per output row), "int4", "bfloat16" or "float32" (`QuantizedLinear`);
        default `default_head(tables)`: int8 with int8 or int4 tables, bfloat16 with bfloat16, else float32 (left
        as it is).
    embedding: the token embedding, the same choices (`QuantizedEmbedding`); default: as `head`.
    huge_pages: put the frozen CPU tables on transparent huge pages (`tables_to_huge_pages`) for decoding.
    group_size: values per scale of int4 rows (a power of two; None: one scale per row).
    A dense model has no tables: only its head and embedding change.
    """
    dt = None if tables is None else torch_dtype(tables, "tables")
    head = default_head(tables) if head is None else head
    head_dt = torch_dtype(head, "head", ROW_DTYPES)
    embed_dt = torch_dtype(head if embedding is None else embedding, "embedding", ROW_DTYPES)
    if dt is not None:
        for m in model.modules():
            if isinstance(m, MemoryLayer):
                m.freeze(dt, group_size)
        if huge_pages:
            tables_to_huge_pages(model)
    model.head = freeze_rows(model.head, head_dt, group_size)
    model.embed = freeze_rows(model.embed, embed_dt, group_size)
    return model


def frozen(model: nn.Module) -> bool:
    """Is `model` frozen for inference (its tables by `freeze`, or a quantised head/embedding)?"""
    return quantized_parts(model) is not None or any(
        isinstance(m, MemoryLayer) and m.activation_dtype is not None for m in model.modules())


def quantized_parts(model: nn.Module) -> str | None:
    """"<head dtype>/<embedding dtype>" (the HEAD_KEY tag) when the head or the embedding is quantised, else None."""
    if isinstance(model.head, QuantizedLinear) or isinstance(model.embed, QuantizedEmbedding):
        return f"{_rows_tag(model.head)}/{_rows_tag(model.embed)}"
    return None


def _rows_tag(m: nn.Module) -> str:
    return m.dtype_tag() if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) else dtype_name(rows_of(m)[0].dtype)


def tables_tag(model: nn.Module) -> str | None:
    """"<table dtype>/<activation dtype>" (the TABLES_KEY tag) when the tables are frozen, else None."""
    tags = {f"{m.tables_name()}/{dtype_name(m.activation_dtype)}"
            for m in model.modules() if isinstance(m, MemoryLayer) and m.activation_dtype is not None}
    if len(tags) > 1:
        raise MemoryFormerError(f"model: memory tables frozen to several dtypes ({sorted(tags)}); expected one")
    return tags.pop() if tags else None


def inference_metadata(model: nn.Module) -> dict[str, str]:
    """The safetensors metadata `save_model` writes for a frozen model: {TABLES_KEY: ..., HEAD_KEY: ...}."""
    tables, head = tables_tag(model), quantized_parts(model)
    return {**({TABLES_KEY: tables} if tables else {}), **({HEAD_KEY: head} if head else {})}


def parse_tables_tag(tag: str, file) -> tuple[str, torch.dtype]:
    """(table dtype name, activation dtype) of a TABLES_KEY tag such as "int8/float32" or "int4-g64/float32", else
    one line naming file."""
    tables, _, act = tag.partition("/")
    if parse_dtype_tag(tables)[0] is None or act not in DTYPES[:3]:
        raise MemoryFormerError(f"{file}: unknown {TABLES_KEY} {tag!r} (expected '<{'|'.join(DTYPES[:4])}|int4-g<G>|"
                                "int4-row>/<dtype>')")
    return tables, torch_dtype(act)


def parse_dtype_tag(name: str) -> tuple[str | None, int | None]:
    """(dtype name, int4 group size or None) of one dtype in a metadata tag: "int8" -> ("int8", None),
    "int4-g64" -> ("int4", 64), "int4-row" -> ("int4", 0); (None, None) for anything else."""
    group = parse_int4_name(name)
    if group is not None:
        return "int4", group
    return (name, None) if name in DTYPES and name != "int4" else (None, None)
