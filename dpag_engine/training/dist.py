"""Distributed training under torchrun: this process's rank and device, the process group, rank 0
going first, the mean of a metric over ranks, and the loss module that DDP wraps.

The policy is wrapped as a module whose forward *is* `compute_loss`, and that module is what DDP
wraps: every U-Net call of a step (static branch, the VJP for the force, the no-grad guided branch)
happens inside one DDP forward and one `backward()`, so each parameter's gradient is all-reduced
exactly once per step. The force VJP is `torch.autograd.grad` w.r.t. the latent only: it never
reaches a parameter's gradient accumulator, so DDP's hooks do not fire for it.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL when each rank has a GPU, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {device!r} requested but CUDA is not available")
        dev = torch.device(f"cuda:{local_rank}") if world > 1 or device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


@contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the body before the other ranks start theirs: for work done once that all then read."""
    if d.enabled and not d.main:
        dist.barrier()
    yield
    if d.enabled and d.main:
        dist.barrier()


def all_reduce_mean(values: list[float], d: Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return (t / d.world).tolist()


class LossModule(nn.Module):
    """forward == policy.compute_loss, so DDP sees all of a step's U-Net calls as one forward."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        return self.policy.compute_loss(batch, generator)


def loss_module(policy: nn.Module, d: Dist, find_unused_parameters: bool = False) -> nn.Module:
    """The LossModule of `policy`, DDP-wrapped when there is more than one rank."""
    module = LossModule(policy)
    if not d.enabled:
        return module
    # No per-step buffer sync: the only buffers are the normaliser statistics and diffusion
    # tables, identical on every rank by construction (DDP still syncs them once at init).
    # The option was renamed in recent torch; use whichever this version has.
    no_sync_buffers = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters, **no_sync_buffers)
