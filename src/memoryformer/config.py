"""Model configuration: one typed dataclass, validated on construction, and the named presets.

The same dataclass is written as JSON next to every checkpoint (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields


class MemoryFormerError(Exception):
    """An error caused by what the user asked for (bad config, file, flag); the CLI prints it as one line."""


class ConfigError(MemoryFormerError, ValueError):
    """A configuration field holds a value outside what it accepts."""


def dataclass_from_dict(cls, data, *, source: str, what: str):
    """`cls(**data)`, refusing anything but a mapping of `cls`'s fields with an error that names the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of {what} fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {what} key {unknown[0]!r} (valid keys: {', '.join(sorted(known))})")
    return cls(**data)


ARCHS = ("memoryformer", "transformer")
WEIGHTINGS = ("code", "paper")
BLOCK_ACTIVATIONS = (None, "gelu")
ATTENTIONS = ("softmax", "linformer", "cosformer", "performer")


@dataclass
class ModelConfig:
    """Shape of a MemoryFormer or of its dense (Pythia / GPT-NeoX) control.

    `arch` picks the model class; the memory fields (`tau` … `block_activation`) only apply to "memoryformer".
    """

    arch: str = "memoryformer"
    vocab_size: int = 50304
    n_layer: int = 6
    d_model: int = 512
    n_head: int = 8
    max_seq_len: int = 2048
    tau: int = 8  # bits per hash chunk; K = d_model // tau tables per Memory Layer
    expand_bits: int = 2  # Memory Block: layer 2 hashes tau + expand_bits bits (paper §2.4)
    weighting: str = "code"  # "code": ||z||_1 * p(z) (authors' code); "paper": p(z) (Eq. 10)
    temperature: float = 1.0  # t in Eq. 10
    block_activation: str | None = None  # None (paper) or "gelu" between the two Memory Block layers (Table 6)
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embeddings
    rotary_base: float = 10000.0
    ffn_mult: int = 4  # dense control only: FFN width = ffn_mult * d_model
    memory_bias: bool = True  # learned bias on every Memory Layer (as in the authors' code)
    bit_order: str = "msb"  # "msb": chunk element j is bit tau-1-j (Fig. 2, authors' code); "lsb": bit j (Eq. 4)
    hash_projection: bool = False  # hash a learned Linear(in, in) of each Memory Layer's input (off in the paper)
    attention: str = "softmax"  # dense control only: "linformer" | "cosformer" | "performer" (Table 2 baselines)
    linformer_k: int = 64  # Linformer: compressed key/value rows per max_seq_len window (blocks of max_seq_len / k)
    performer_features: int = 128  # Performer: random features per head

    def __post_init__(self):
        def fail(name, msg):
            raise ConfigError(f"{name}: {msg} (got {getattr(self, name)!r})")

        def want_int(name, lo, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                fail(name, "expected an integer")
            if v < lo or (hi is not None and v > hi):
                fail(name, f"expected an integer in [{lo}, {hi if hi is not None else 'inf'}]")

        def want_float(name, lo, hi=None, open_lo=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                fail(name, "expected a number")
            v = float(v)
            setattr(self, name, v)
            bad = (v <= lo) if open_lo else (v < lo)
            if bad or (hi is not None and v > hi):
                fail(name, f"expected a number in {'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}]")

        if self.arch not in ARCHS:
            fail("arch", f"expected one of {ARCHS}")
        want_int("vocab_size", 2)
        want_int("n_layer", 1)
        want_int("d_model", 1)
        want_int("n_head", 1)
        want_int("max_seq_len", 1)
        want_int("tau", 1, 16)
        want_int("expand_bits", 0, 4)
        want_int("ffn_mult", 1)
        if self.weighting not in WEIGHTINGS:
            fail("weighting", f"expected one of {WEIGHTINGS}")
        want_float("temperature", 0.0, open_lo=True)
        if self.bit_order not in ("msb", "lsb"):
            fail("bit_order", "expected 'msb' or 'lsb'")
        if not isinstance(self.hash_projection, bool):
            fail("hash_projection", "expected true or false")
        if self.block_activation not in BLOCK_ACTIVATIONS:
            fail("block_activation", f"expected one of {BLOCK_ACTIVATIONS}")
        want_float("rotary_pct", 0.0, 1.0)
        want_float("rotary_base", 0.0, open_lo=True)
        if not isinstance(self.memory_bias, bool):
            fail("memory_bias", "expected true or false")
        if self.attention not in ATTENTIONS:
            fail("attention", f"expected one of {ATTENTIONS}")
        if self.attention != "softmax" and self.arch != "transformer":
            fail("attention", "only the dense control (arch='transformer') takes an efficient attention")
        want_int("linformer_k", 1)
        want_int("performer_features", 1)
        if self.attention == "linformer" and self.max_seq_len % self.linformer_k:
            fail("linformer_k", f"expected a divisor of max_seq_len={self.max_seq_len} (blocks of max_seq_len / k)")
        if self.d_model % self.n_head:
            fail("n_head", f"expected a divisor of d_model={self.d_model}")
        if self.arch == "memoryformer":
            if self.d_model % self.tau:
                fail("tau", f"expected a divisor of d_model={self.d_model} (d_model = tau * K)")
            if self.tau + self.expand_bits > 16:
                fail("expand_bits", f"tau + expand_bits must be <= 16 (tau={self.tau})")

    # -- derived sizes ---------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_tables(self) -> int:
        """K: tables per Memory Layer (chunks of tau dims in the d_model-wide input)."""
        return self.d_model // self.tau

    @property
    def block_hidden(self) -> int:
        """Width between the two Memory Block layers: (tau + expand_bits) * K."""
        return (self.tau + self.expand_bits) * self.n_tables

    @property
    def rotary_dims(self) -> int:
        """Dims per head that are rotated (rounded down to an even number)."""
        return int(self.head_dim * self.rotary_pct) // 2 * 2

    # -- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "ModelConfig":
        return dataclass_from_dict(cls, data, source=source, what="config")

    def replace(self, **overrides) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **overrides}, source="override")

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise MemoryFormerError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MemoryFormerError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))


# Presets. The paper's scales (Table 1) and their Pythia controls; `micro` trains on two CPU cores in minutes.
_PRESETS: dict[str, dict] = {
    "micro": dict(arch="memoryformer", n_layer=4, d_model=128, n_head=4, max_seq_len=256, tau=8),
    "micro-dense": dict(arch="transformer", n_layer=4, d_model=128, n_head=4, max_seq_len=256),
    "tiny": dict(arch="memoryformer", n_layer=6, d_model=512, n_head=8, tau=8),
    "small": dict(arch="memoryformer", n_layer=12, d_model=768, n_head=12, tau=8),
    "base": dict(arch="memoryformer", n_layer=24, d_model=1024, n_head=16, tau=8),
    "pythia-70m": dict(arch="transformer", n_layer=6, d_model=512, n_head=8),
    "pythia-160m": dict(arch="transformer", n_layer=12, d_model=768, n_head=12),
    "pythia-410m": dict(arch="transformer", n_layer=24, d_model=1024, n_head=16),
}
# The dense control each MemoryFormer preset is compared with (same layers, width, heads).
DENSE_CONTROL = {"micro": "micro-dense", "tiny": "pythia-70m", "small": "pythia-160m", "base": "pythia-410m"}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name ("micro", "tiny", "small", "base", "micro-dense", "pythia-70m", ...), with overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (valid: {', '.join(_PRESETS)})")
    return ModelConfig.from_dict({**_PRESETS[name], **overrides}, source=f"preset {name!r}")
