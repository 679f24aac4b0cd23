"""Checkpoints: `files` (model.safetensors + config.json + manifest.json and their checks), `weights`
(`save_model`, `load_model`: `memoryformer.save_model` / `memoryformer.load`), `training` (training checkpoints
that resume bit for bit; finding, listing and pruning them). Everything public is importable from here."""

from memoryformer.checkpoint.files import (
    CONFIG,
    INFERENCE_KEY,
    MANIFEST_KEY,
    WEIGHTS,
    CheckpointError,
    atomic_dir,
    check_config,
    infer_config_fields,
)
from memoryformer.checkpoint.training import (
    OPTIMIZER,
    RNG,
    TRAINER,
    TRAINING_FILES,
    _flatten_optimizer,
    _unflatten_optimizer,
    find_checkpoint,
    find_resumable,
    is_checkpoint_name,
    list_checkpoints,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
)
from memoryformer.checkpoint.weights import load_model, resolve_device, save_model

__all__ = [
    "CONFIG", "INFERENCE_KEY", "MANIFEST_KEY", "OPTIMIZER", "RNG", "TRAINER", "TRAINING_FILES", "WEIGHTS",
    "CheckpointError", "_flatten_optimizer", "_unflatten_optimizer", "atomic_dir", "check_config",
    "find_checkpoint", "find_resumable", "infer_config_fields", "is_checkpoint_name", "list_checkpoints",
    "load_model", "load_training_checkpoint", "prune_checkpoints", "resolve_device", "save_model",
    "save_training_checkpoint",
]
