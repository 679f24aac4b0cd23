"""Building an inference model tensor by tensor, so the fp32 model is never in memory: from a `save_model`
checkpoint (`load_for_inference`, which `memoryformer.load(path, tables=...)` calls) or from random values of a
config's shapes (`random_inference_model`, for benchmarks).

The model is built on the meta device; each Memory Layer's tables and the head and embedding are converted a chunk
at a time into their target dtype and installed with the same primitives as `freeze` (`MemoryLayer.set_frozen`,
the quantised row modules); every other tensor is read as float32 and assigned with `load_state_dict`. Memory
Layer tables land on huge pages (`tables_to_huge_pages`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from memoryformer.config import CONFIG_FILE as CONFIG
from memoryformer.config import DTYPES, HEAD_KEY, ROW_DTYPES, TABLES_KEY, MemoryFormerError, ModelConfig
from memoryformer.config import WEIGHTS_FILE as WEIGHTS
from memoryformer.inference.freeze import parse_dtype_tag, parse_tables_tag
from memoryformer.inference.huge_pages import huge_empty, mark_huge
from memoryformer.inference.quantized import QuantizedEmbedding, QuantizedLinear, plain_rows
from memoryformer.integrity import check_finite
from memoryformer.layers import MemoryLayer
from memoryformer.ops.int4 import INT4_GROUP, group_count
from memoryformer.ops.quant import quantize_rows_into, to_storage, torch_dtype

CHUNK_BYTES = 16 << 20  # converted per read: the fp32 rows in flight at once
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8,
                       "U8": torch.uint8}  # U8: packed int4 rows


class _FileSource:
    """Rows of the tensors of one safetensors file, read a chunk at a time.

    The file is opened (memory-mapped) anew for each chunk, so the pages a chunk touched leave the process's
    resident set when it is closed: the peak is the model being built plus one chunk, not the file.
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(path, framework="pt") as f:
                self.meta = f.metadata() or {}
                self.info = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise MemoryFormerError(f"{path}: unreadable safetensors file ({e})") from None
        old = next((k for k in self.info if k.endswith(".table_scale")), None)
        if old is not None:
            raise MemoryFormerError(f"{path}: int8 tables with their scales under {old!r}, a layout this version no "
                                    "longer reads; export the trained checkpoint again (memoryformer export --tables)")

    def has(self, name: str) -> bool:
        return name in self.info

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.info:
            raise MemoryFormerError(f"{self.path}: missing tensor {name!r} (the file does not match {CONFIG})")
        return self.info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        self.shape(name)
        code = self.info[name][1]
        if code not in _SAFETENSORS_DTYPES:
            raise MemoryFormerError(f"{self.path}: tensor {name!r} has dtype {code}; expected F32, BF16, F16, I8 or U8")
        return _SAFETENSORS_DTYPES[code]

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        from safetensors import safe_open

        self.shape(name)
        with safe_open(self.path, framework="pt") as f:
            sl = f.get_slice(name)
            return sl[a:b] if len(self.info[name][0]) else sl[:]


class _RandomSource:
    """Random tensors of a model's shapes with its init's scale (tables as int8 rows + scales: fast to draw)."""

    def __init__(self, model: nn.Module, seed: int):
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        for name, m in model.named_modules():  # int8 draws come with a scale per row
            if isinstance(m, MemoryLayer):
                self.shapes[_join(name, "scale")] = tuple(m.tables.shape[:-1])
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = __import__("numpy").random.default_rng(seed)
        self.d = model.config.d_model

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.int8 if name.endswith(".tables") else torch.float32

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        shape = (b - a, *self.shapes[name][1:]) if self.shapes[name] else ()
        if name.endswith(".tables"):  # uniform bytes (fast to draw for GB of tables)
            n = math.prod(shape)
            return torch.frombuffer(bytearray(self.rng.bytes(n)), dtype=torch.int8).view(shape)
        if name.endswith(".scale"):  # uniform int8 has std 128/sqrt(3): dequantised std 0.02, the tables' init
            return torch.full(shape, 0.02 * math.sqrt(3) / 128)
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name:
            return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        std = 0.001 if leaf == "bias" else math.sqrt(2 / (5 * self.d))
        return torch.randn(shape, generator=self.gen) * std


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _where(src) -> str:
    return str(getattr(src, "path", "source"))


def _convert(src, name: str, scale_name: str, dtype: torch.dtype, huge: bool, group: int | None = None):
    """Tensor `name` of `src` in `dtype` (int8: + one fp32 scale per row; int4: + fp16 scales of `group` values),
    converted CHUNK_BYTES at a time."""
    if dtype == torch.int4:
        return _convert_int4(src, name, scale_name, group, huge)
    shape = src.shape(name)
    if src.dtype(name) == torch.uint8:  # int4 rows: two values per byte
        shape = (*shape[:-1], 2 * shape[-1])
    if not shape:
        return src.read(name, 0, 1).to(dtype), None
    out = huge_empty(shape, dtype) if huge else torch.empty(shape, dtype=dtype)
    scale = torch.empty(shape[:-1]) if dtype == torch.int8 else None
    step = max(1, CHUNK_BYTES // (4 * max(1, math.prod(shape[1:]))))
    stored_int8 = _quantized(src, name, scale_name)
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        x = src.read(name, a, b)
        s = src.read(scale_name, a, b) if stored_int8 else None
        check_finite({name: x} if s is None else {name: x, scale_name: s}, _where(src))
        if dtype == torch.int8 and not stored_int8:
            quantize_rows_into(x.float(), out[a:b], scale[a:b])
            continue
        q, qs = to_storage(x, s, dtype)
        out[a:b] = q
        if scale is not None:
            scale[a:b] = qs
    return out, scale


def _quantized(src, name: str, scale_name: str) -> bool:
    """Is `name` stored as int8 / int4 rows (whose scales `scale_name` must then be there)?"""
    if src.dtype(name) not in (torch.int8, torch.uint8):
        return False
    if not src.has(scale_name):
        raise MemoryFormerError(f"{_where(src)}: {'int4' if src.dtype(name) == torch.uint8 else 'int8'} tensor "
                                f"{name!r} has no {scale_name!r}")
    return True


def _convert_int4(src, name: str, scale_name: str, group: int | None, huge: bool):
    """Tensor `name` of `src` as int4 rows (packed uint8, fp16 scales of `group` values), CHUNK_BYTES at a time."""
    shape = src.shape(name)
    stored = _quantized(src, name, scale_name)
    h = 2 * shape[-1] if src.dtype(name) == torch.uint8 else shape[-1]
    if h % 2:
        raise MemoryFormerError(f"{_where(src)}: {name!r} has rows of {h} values; int4 needs an even width")
    packed = (*shape[:-1], h // 2)
    out = huge_empty(packed, torch.uint8) if huge else torch.empty(packed, dtype=torch.uint8)
    scale = torch.empty(*shape[:-1], group_count(h, group), dtype=torch.float16)
    step = max(1, CHUNK_BYTES // (4 * h * max(1, math.prod(shape[1:-1]))))
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        x = src.read(name, a, b)
        s = src.read(scale_name, a, b) if stored else None
        check_finite({name: x} if s is None else {name: x, scale_name: s}, _where(src))
        out[a:b], scale[a:b] = to_storage(x, s, torch.int4, group)
    return out, scale


def _check_shapes(model: nn.Module, src) -> None:
    for name, t in model.state_dict(keep_vars=True).items():
        if not src.has(name):
            continue
        want = tuple(t.shape)
        if src.dtype(name) == torch.uint8 and want:  # int4: two values per byte
            want = (*want[:-1], want[-1] // 2)
        if tuple(src.shape(name)) != want:
            raise MemoryFormerError(f"{_where(src)}: tensor {name!r} has shape {tuple(src.shape(name))}, the "
                                    f"{CONFIG} beside it implies {want}")


def _target(src, name: str, dtype: torch.dtype | None, group: int | None, stored_group: int | None):
    """(dtype, int4 group size) tensor `name` is loaded in: `dtype` with `group`, or None: as stored (uint8 rows
    are int4 with the group size of the file's tag)."""
    if dtype is not None:
        return dtype, group
    if src.dtype(name) != torch.uint8:
        return src.dtype(name), None
    if stored_group is None:
        raise MemoryFormerError(f"{_where(src)}: {name!r} holds int4 rows but the file's metadata gives no "
                                "int4 group size")
    return torch.int4, stored_group


def _rows_module(model: nn.Module, prefix: str, src, dtype: torch.dtype | None, group=None, stored=None) -> nn.Module:
    """The head or embedding `prefix` of `model` read from `src` in `dtype` (None: as stored; int4 rows in groups
    of `group` values, as stored in groups of `stored`)."""
    like = getattr(model, prefix)
    name = _join(prefix, "weight")
    dt, g = _target(src, name, dtype, group, stored)
    w, scale = _convert(src, name, _join(prefix, "scale"), dt, False, g)
    if dt == torch.float32 or dt == torch.float16:
        return plain_rows(like, w.float())
    linear = isinstance(like, nn.Linear)
    cls = QuantizedLinear if linear else QuantizedEmbedding
    shape = (like.in_features, like.out_features) if linear else (like.num_embeddings, like.embedding_dim)
    new = cls(*shape, dtype=dt, device="meta", group_size=g)
    new.load_weight(w, scale)
    return new


@torch.no_grad()
def _materialize(cfg: ModelConfig, src, tables, head, embed, huge_pages: bool, act=torch.float32,
                 group: int | None = INT4_GROUP, stored: tuple = (None, None, None)) -> nn.Module:
    """Build `cfg`'s model on the meta device, then give each tensor real storage from `src` in its target dtype
    (None: as stored; int4 in groups of `group` values, or as stored in groups of `stored` = (tables, head,
    embedding)). Memory Layer tables land on huge pages when `huge_pages`."""
    from memoryformer.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    _check_shapes(model, src)
    for prefix, m in list(model.named_modules()):
        if isinstance(m, MemoryLayer):
            name = _join(prefix, "tables")
            dt, g = _target(src, name, tables, group, stored[0])
            q, scale = _convert(src, name, _join(prefix, "scale"), dt, huge_pages, g)
            m.set_frozen(q, scale, act, g)
            if huge_pages:
                mark_huge(m.tables)
    model.head = _rows_module(model, "head", src, head, group, stored[1])
    model.embed = _rows_module(model, "embed", src, embed, group, stored[2])
    rest = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_meta:
            continue
        if src.dtype(name) in (torch.int8, torch.uint8):
            raise MemoryFormerError(f"{_where(src)}: {name!r} is {src.info[name][1]}; expected a float tensor")
        rest[name] = src.read(name, 0, src.shape(name)[0] if src.shape(name) else 1).float()
        check_finite({name: rest[name]}, _where(src))
    model.load_state_dict(rest, strict=False, assign=True)
    model.rotary.to_empty(device="cpu").reset_parameters()  # not saved: computed
    left = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if left is not None:
        raise MemoryFormerError(f"{_where(src)}: the loader has no values for {left!r}")
    return model.requires_grad_(False).eval()


def _read_config(path: Path) -> ModelConfig:
    if not path.is_dir():
        raise MemoryFormerError(f"{path}: not a checkpoint directory (expected {WEIGHTS} and {CONFIG} inside)")
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise MemoryFormerError(f"{path / name}: missing (a checkpoint holds {WEIGHTS} and {CONFIG})")
    return ModelConfig.load(path / CONFIG)


def _dtypes(tables, head, embed) -> tuple:
    """The target dtypes (None: as stored) of tables, head and embedding, each checked against its choices."""
    return (None if tables is None else torch_dtype(tables, "tables", DTYPES),
            None if head is None else torch_dtype(head, "head", ROW_DTYPES),
            None if embed is None else torch_dtype(embed, "embed", ROW_DTYPES))


def _stored_groups(meta: dict, file) -> tuple:
    """The int4 group sizes (None where not int4) of the tables, head and embedding, from the file's tags."""
    tag, head = meta.get(TABLES_KEY), meta.get(HEAD_KEY, "")
    tables = parse_dtype_tag(parse_tables_tag(tag, file)[0])[1] if tag else None
    parts = head.split("/") if head else []
    return (tables, *(parse_dtype_tag(p)[1] for p in parts[:2]), None, None)[:3]


def load_for_inference(path, tables: str | None = "int8", head: str | None = "int8", embed: str | None = None,
                       device: str = "cpu", huge_pages: bool = True, group_size: int | None = INT4_GROUP) -> nn.Module:
    """An inference model from a `memoryformer.save_model` directory, built tensor by tensor.

    tables: "int8" (one scale per row), "int4" (one fp16 scale per `group_size` values), "bfloat16", "float16",
    "float32", or None (as stored). head: the LM head, "int8" (one scale per output row), "int4", "bfloat16",
    "float32", or None (as stored). embed: the token embedding, the same choices (default: as `head`). Tensors
    already frozen in the file (`memoryformer.freeze` + `save_model`) are read as they are when the dtype (and the
    int4 group size) matches, else converted. Each tensor is converted in chunks of CHUNK_BYTES, so the peak memory
    is the inference model plus one chunk. `device`: where the model ends up (built on the CPU; the tables on huge
    pages there when `huge_pages`).
    """
    path = Path(path)
    cfg = _read_config(path)
    src = _FileSource(path / WEIGHTS)
    tag = src.meta.get(TABLES_KEY)
    act = parse_tables_tag(tag, path / WEIGHTS)[1] if tag else torch.float32
    dts = _dtypes(tables, head, embed if embed is not None else head)
    model = _materialize(cfg, src, *dts, huge_pages=huge_pages and str(device) == "cpu", act=act, group=group_size,
                         stored=_stored_groups(src.meta, path / WEIGHTS))
    return model if device == "cpu" else model.to(device)


def random_inference_model(cfg: ModelConfig, tables: str = "int8", head: str = "int8", embed: str | None = None,
                           seed: int = 0, huge_pages: bool = True) -> nn.Module:
    """A MemoryFormer of `cfg` with random weights built directly in its inference precisions (benchmarks): the
    tables are drawn as int8 rows, so an int8 MF-small never holds more than its 2 GB."""
    from memoryformer.model import build_model

    with torch.device("meta"):
        shapes = build_model(cfg)
    return _materialize(cfg, _RandomSource(shapes, seed), *_dtypes(tables, head, embed or head), huge_pages=huge_pages)


__all__ = ["CHUNK_BYTES", "load_for_inference", "random_inference_model"]
