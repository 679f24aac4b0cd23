"""CPU inference: freezing a model, quantised head and embedding, the compiled decode engine, streaming loading.

    import memoryformer as mf
    from memoryformer.inference import DecodeEngine

    model = mf.load("runs/small/final", tables="int8")   # built tensor by tensor: never holds the fp32 model
    engine = DecodeEngine(model)                         # batch 1, cache of max_seq_len
    logits = engine.prefill(prompt_ids)          # (B, T) -> (B, V) logits of the last prompt token
    logits = engine.step(logits.argmax(-1))      # (B,) -> (B, V), one token, K/V written into the cache
    out = engine.generate(prompt_ids, 128)       # greedy: (B, T + 128)

- `freeze` (`mf.freeze`): tables, head and embedding frozen in place, one function for every freeze (`freeze.py`).
- `QuantizedLinear` / `QuantizedEmbedding`: the head and embedding as int8 rows + `scale`, int4 rows (two values
  per byte) + group-wise `scale`, or bfloat16 (`quantized.py`).
- `DecodeEngine`, `engine_for`: the whole decode step in one C++ call over a static cache; `generate()` decodes
  through `engine_for(model)` when the model is frozen and `DecodeEngine.supports(model)` (`engine.py`).
- `load_for_inference`, `random_inference_model`: build the inference model tensor by tensor from a `save_model`
  checkpoint (`memoryformer.load(path, tables=...)` calls it) or from random values (`loader.py`).
- `tables_to_huge_pages`: the Memory Layer tables on transparent huge pages, an explicit call that the loader and
  `freeze` make (`huge_pages.py`).
"""

from memoryformer.config import HEAD_KEY, TABLES_KEY
from memoryformer.inference.engine import DecodeEngine, engine_for
from memoryformer.inference.freeze import (
    default_head,
    freeze,
    frozen,
    inference_metadata,
    parse_tables_tag,
    quantized_parts,
    tables_tag,
)
from memoryformer.inference.huge_pages import tables_to_huge_pages, to_huge_pages
from memoryformer.inference.loader import load_for_inference, random_inference_model
from memoryformer.inference.quantized import SMALL_M, QuantizedEmbedding, QuantizedLinear, freeze_rows

__all__ = [
    "HEAD_KEY",
    "SMALL_M",
    "TABLES_KEY",
    "DecodeEngine",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "default_head",
    "engine_for",
    "freeze",
    "freeze_rows",
    "frozen",
    "inference_metadata",
    "load_for_inference",
    "parse_tables_tag",
    "quantized_parts",
    "random_inference_model",
    "tables_tag",
    "tables_to_huge_pages",
    "to_huge_pages",
]
