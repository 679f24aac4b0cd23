"""memoryformer: MemoryFormer (Ding et al., NeurIPS 2024) in PyTorch.

    import memoryformer as mf
    layer = mf.MemoryLayer(512, 512, tau=8)              # drop-in for nn.Linear(512, 512)
    model = mf.MemoryFormer(mf.get_config("tiny"))        # the paper's MF-tiny
    dense = mf.Transformer(mf.get_config("pythia-70m"))   # its dense control

Submodules load on first use, so `import memoryformer` (and the command line's start) stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.4.0"

_EXPORTS = {
    "ConfigError": "config", "MemoryFormerError": "config", "ModelConfig": "config", "TrainConfig": "config",
    "get_config": "config", "preset_names": "config",
    "MemoryLayer": "layers", "MemoryFFN": "layers", "MemoryBlock": "layers", "freeze": "inference",
    "MemoryFormer": "model", "Transformer": "model", "LanguageModel": "model", "KVCache": "model",
    "build_model": "model",
    "save_model": "checkpoint", "load": ("checkpoint", "load_model"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'memoryformer' has no attribute {name!r}")
    module, attr = (target, name) if isinstance(target, str) else target
    value = getattr(importlib.import_module(f"memoryformer.{module}"), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
