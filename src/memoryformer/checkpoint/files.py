"""Checkpoint files: a directory with `model.safetensors`, `config.json` (the resolved ModelConfig) and
`manifest.json` (size and SHA-256 of each file, see `memoryformer.integrity`); what writing and reading
`model.safetensors` checks (no NaN/inf written, the manifest, config.json against the tensors' shapes), shared by
`weights` (save_model / load_model) and `training` (training checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from memoryformer.config import CONFIG_FILE, TABLES_KEY, WEIGHTS_FILE, MemoryFormerError, ModelConfig
from memoryformer.integrity import check_finite, durable_replace, ensure_dir, finish_file, replace_file, verify_files

WEIGHTS, CONFIG = WEIGHTS_FILE, CONFIG_FILE
INFERENCE_KEY = TABLES_KEY  # safetensors metadata: "<table dtype>/<activation dtype>"
MANIFEST_KEY = "memoryformer.manifest"  # safetensors metadata: "1" when the folder's writer wrote a manifest


class CheckpointError(MemoryFormerError):
    """A checkpoint directory is missing, incomplete or does not match what was asked for."""


def _write_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    check_finite(state, f"{path / WEIGHTS}: not written")
    meta = {"format": "pt", "library": "memoryformer", MANIFEST_KEY: "1", **(extra or {})}

    def write(tmp: Path) -> None:
        save_file(state, tmp, metadata=meta)
        canonical_header(tmp)

    replace_file(path / WEIGHTS, write)
    replace_file(path / CONFIG, cfg.save)


def canonical_header(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted, in place: the writer emits them in a
    per-process hash order, so two saves of the same tensors would differ in bytes (and in checksum)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw, object_pairs_hook=dict)
        if "__metadata__" in header:
            header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                      **{k: v for k, v in header.items() if k != "__metadata__"}}
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > n or len(text) != len(raw.rstrip(b" ")):  # same content reordered: never longer
            raise CheckpointError(f"{path}: unexpected safetensors header layout; not written")
        f.seek(8)
        f.write(text.ljust(n, b" "))



def _read_weights(path: Path, verify: bool, device: str = "cpu", names=(WEIGHTS, CONFIG)) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of path/model.safetensors; with `verify`, the files `names` checked against
    the manifest and the tensors checked for NaN/inf."""
    from safetensors.torch import load_file

    if verify and names:  # before parsing anything: a truncated or damaged file is named as such
        _verify(path, names)
    with _unreadable(path):
        meta = _metadata(path)
        state = load_file(path / WEIGHTS, device=device)
    if verify:
        check_finite(state, str(path / WEIGHTS))
    return state, meta



@contextlib.contextmanager
def _unreadable(path: Path):
    """Reading path/model.safetensors fails with one line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable safetensors file ({e})") from None



def _verify(path: Path, names) -> None:
    """The files `names` of checkpoint folder `path` against its manifest (one that its writer wrote must exist)."""
    with _unreadable(path):
        verify_files(path, names, required=lambda: _metadata(path).get(MANIFEST_KEY) == "1")



def _read_metadata(path: Path) -> dict:
    with _unreadable(path):
        return _metadata(path)



def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path / WEIGHTS, framework="pt") as f:
        return f.metadata() or {}



@contextlib.contextmanager
def _write_errors(dest: Path):
    """A full disk, a file-size limit or a read-only place, as one line naming the checkpoint."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        why = getattr(e, "strerror", None) or " ".join(str(e).split())
        raise CheckpointError(f"{dest}: cannot write the checkpoint ({why}); nothing was replaced") from None



@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike):
    """Yield a temporary sibling of `dest` to fill; on success its files are fsynced and it replaces `dest` in one
    rename."""
    dest = Path(dest)
    ensure_dir(dest.parent)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            finish_file(f)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            durable_replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            durable_replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)




# config.json against the tensors


def infer_config_fields(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The ModelConfig fields that a state dict's tensor names and shapes determine."""
    out: dict = {}
    if len(shapes.get("embed.weight", ())) == 2:
        out["vocab_size"], out["d_model"] = shapes["embed.weight"]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        return out
    out["n_layer"] = max(blocks) + 1
    qkv = shapes.get("blocks.0.attn.qkv.tables")
    out["arch"] = "memoryformer" if qkv is not None else "transformer"
    if qkv is not None and len(qkv) == 3 and qkv[1] & (qkv[1] - 1) == 0:
        out["tau"] = qkv[1].bit_length() - 1
        l2 = shapes.get("blocks.0.mlp.l2.tables")
        if l2 is not None and len(l2) == 3:
            out["expand_bits"] = l2[1].bit_length() - 1 - out["tau"]
        out["memory_bias"] = "blocks.0.attn.qkv.bias" in shapes
        out["hash_projection"] = "blocks.0.attn.qkv.proj.weight" in shapes
    fc = shapes.get("blocks.0.mlp.fc.weight")
    if fc is not None and "d_model" in out and out["d_model"]:
        out["ffn_mult"] = fc[0] // out["d_model"]
    if "blocks.0.attn.core.E" in shapes:
        k, block = shapes["blocks.0.attn.core.E"]
        out.update(attention="linformer", linformer_k=k, max_seq_len=k * block)
    if "blocks.0.attn.core.proj" in shapes:
        out.update(attention="performer", performer_features=shapes["blocks.0.attn.core.proj"][0])
    return out


def check_config(cfg: ModelConfig, state: dict, expected: dict, path: Path) -> None:
    """`config.json` against the tensors read from `model.safetensors`: the first field they contradict, else the
    first tensor whose name or shape differs from what the config builds (`expected`: the built model's state)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, value in infer_config_fields(shapes).items():
        if getattr(cfg, name) != value:
            raise CheckpointError(f"{path / CONFIG}: {name}={getattr(cfg, name)!r} does not match {WEIGHTS}, whose "
                                  f"tensors give {name}={value!r}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS}: does not match {CONFIG} (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    for k, want in expected.items():
        if shapes[k] != tuple(want.shape):
            raise CheckpointError(f"{path / WEIGHTS}: tensor {k!r} has shape {shapes[k]}, but {CONFIG} builds "
                                  f"{tuple(want.shape)}")
        got = state[k].dtype
        if got != want.dtype and not (got.is_floating_point and want.dtype.is_floating_point):
            raise CheckpointError(f"{path / WEIGHTS}: tensor {k!r} is {str(got).removeprefix('torch.')}, but the "
                                  f"model keeps it as {str(want.dtype).removeprefix('torch.')}")
