"""Data-parallel training with torch's FSDP2 (`fully_shard`): the same `gemmakit finetune` command, run
under `torchrun`, shards parameters, gradients and optimizer state across processes.

Each decoder layer is its own FSDP unit (its weights are gathered just before it runs and freed after) and
the root holds the tied embedding/head. The backend is NCCL on GPUs and gloo on CPU. Every rank builds the
same global batch from the same seed and takes its slice, so no sampler has to agree on anything; ranks whose
slice is empty (the last step of an epoch) run a zero-weighted copy, because FSDP's collectives need every
rank in every forward and backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str | None = None) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(f"cuda:{local}") if cuda else torch.device(device or "cpu")
    if size == 1:
        return World(0, 1, dev)
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), size, dev)


def shard(model: nn.Module, world: World) -> None:
    """Wrap every decoder layer, then the root, in FSDP2 (no-op for a single process)."""
    if not world.distributed:
        return
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def all_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is true on one (a Ctrl-C seen by one process stops all at the same step)."""
    return all_sum([float(flag)], world)[0] > 0


def shared_error(error: str | None) -> str | None:
    """The first rank's error among all ranks' (collective when distributed; else `error` itself). A failure
    only one rank saw (rank 0's disk filling up while it alone writes a checkpoint) must stop every rank with
    the same message: otherwise the others wait at their next collective for a rank that has left."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def full_norm(norm: Tensor) -> float:
    """clip_grad_norm_'s result as a number (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
