"""The process layout of a training run: devices, torchrun ranks, collectives, and how parallelism wraps the model.

As torchtitan does, the model is written for one device and parallelism is applied from outside: `parallelize`
wraps it in DDP, or shards it with FSDP2 (each Memory Layer its own unit, then each block, then the root).
"""

from __future__ import annotations

import contextlib

import os
from dataclasses import dataclass

import torch

from memoryformer.config import ConfigError, MemoryFormerError


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group (so we tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' requested but no CUDA GPU is available (use --device cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup_runtime(device: str, fsdp: bool) -> Runtime:
    """One process, or this rank of a torchrun group (initialising the group if torchrun did not)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 or dist.is_initialized():
        owns = False
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            owns = True
        return Runtime(dist.get_rank(), dist.get_world_size(), dev, owns)
    if fsdp:
        raise ConfigError("fsdp: FSDP needs several processes; launch with torchrun --nproc_per_node=N")
    return Runtime(0, 1, dev, False)


def teardown(rt: Runtime) -> None:
    if rt.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


@contextlib.contextmanager
def _peers(rt: Runtime):
    """A collective that fails because another rank is gone (it stopped on an error, which it reported, or was
    killed) ends this rank with one line instead of a traceback."""
    try:
        yield
    except RuntimeError as e:
        if "closed" not in str(e).lower() and "reset" not in str(e).lower() and "broken pipe" not in str(e).lower():
            raise
        raise MemoryFormerError(f"rank {rt.rank}: another rank stopped (see its message); stopping too") from None


def all_reduce(x: torch.Tensor, rt: Runtime, op: str = "sum") -> torch.Tensor:
    if rt.world == 1:
        return x
    import torch.distributed as dist

    with _peers(rt):
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x


def barrier(rt: Runtime) -> None:
    if rt.world > 1:
        import torch.distributed as dist

        with _peers(rt):
            dist.barrier()


def apply_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each Memory Layer (its tables and bias) is one unit, each block another, the rest the root."""
    from torch.distributed.fsdp import fully_shard

    from memoryformer.layers import MemoryLayer

    for block in model.blocks:
        for m in block.modules():
            if isinstance(m, MemoryLayer):
                fully_shard(m)
        fully_shard(block)
    fully_shard(model)
    return model


def parallelize(model: torch.nn.Module, rt: Runtime, fsdp: bool) -> torch.nn.Module:
    """The model as the training step calls it: itself (one process), DDP, or FSDP2-sharded in place."""
    if rt.world == 1:
        return model
    if fsdp:
        return apply_fsdp(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def rank_checksums(model: torch.nn.Module, rt: Runtime, sharded: bool) -> list[float]:
    """Sum of |p| over all parameters, per rank (float64): replicas that drifted apart show different values."""
    with torch.no_grad():
        local = sum((p.to_local() if hasattr(p, "to_local") else p).detach().double().abs().sum().item()
                    for p in model.parameters())
    if rt.world == 1:
        return [local]
    import torch.distributed as dist

    t = torch.zeros(rt.world, dtype=torch.float64, device=rt.device)
    t[rt.rank] = local
    dist.all_reduce(t)
    if sharded:  # each rank holds a different shard: the total is the meaningful number
        return [t.sum().item()]
    return t.tolist()
