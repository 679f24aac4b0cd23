"""memoryformer: MemoryFormer (Ding et al., NeurIPS 2024) in PyTorch.

    import memoryformer as mf
    layer = mf.MemoryLayer(512, 512, tau=8)              # drop-in for nn.Linear(512, 512)
    model = mf.MemoryFormer(mf.get_config("tiny"))        # the paper's MF-tiny
    dense = mf.Transformer(mf.get_config("pythia-70m"))   # its dense control
"""

from memoryformer.checkpoint import load_model as load, save_model
from memoryformer.config import ConfigError, MemoryFormerError, ModelConfig, get_config, preset_names
from memoryformer.layers import MemoryBlock, MemoryLayer, to_inference
from memoryformer.model import MemoryFormer, Transformer, build_model

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "MemoryBlock",
    "MemoryFormer",
    "MemoryFormerError",
    "MemoryLayer",
    "ModelConfig",
    "Transformer",
    "build_model",
    "get_config",
    "load",
    "save_model",
    "to_inference",
    "preset_names",
]
