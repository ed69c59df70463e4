"""Data parallelism on PyTorch's own engine, applied to a model from outside: DDP or FSDP2 (`fully_shard`).

Launch with `torchrun --nproc_per_node=N gla train --parallel ddp|fsdp ...`; RANK / WORLD_SIZE / LOCAL_RANK come
from torchrun. Gradient reduction is a SUM everywhere (the loss is already divided by the global token count):
gloo has no ReduceOp.AVG (pytorch#162338), so FSDP2's default averaging reduce-scatter is switched off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from gla.device import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    parallel: str = "none"
    device: torch.device = torch.device("cpu")   # where collectives run (NCCL needs CUDA tensors)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM; a copy on x's device (identity in a single process)."""
        if self.world == 1:
            return x.clone()
        y = x.to(self.device, copy=True)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def setup(parallel: str, device: str) -> tuple[Dist, torch.device]:
    """Join the process group started by torchrun (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:  # one process: nothing to wrap; DDP/FSDP of a single rank is the same computation
        return Dist(), dev
    if parallel == "none":
        raise ValueError(f"running in {world} processes (torchrun): pass --parallel ddp or --parallel fsdp")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":  # one GPU per process, whichever index was named
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, parallel, dev), dev


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around `model` (already on `device`); unchanged in a single process."""
    if d.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if d.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        layers = getattr(model, "layers", None)
        blocks = list(layers) if isinstance(layers, nn.ModuleList) else []
        for block in blocks:   # one shard unit per layer: parameters are gathered just in time, layer by layer
            fully_shard(block)
        fully_shard(model)
        force_sum = hasattr(model, "set_force_sum_reduction_for_comms")
        if not force_sum and device.type != "cuda":
            raise ValueError(f"--parallel fsdp on CPU (gloo) needs torch >= 2.9, got {torch.__version__}")
        for m in [*blocks, model]:
            # sum the gradients, no division; gloo has neither AVG nor the PREMUL_SUM that a divide factor of 1
            # otherwise becomes (NCCL has both), so force plain SUM collectives where torch allows it
            m.set_gradient_divide_factor(1.0)
            if force_sum:
                m.set_force_sum_reduction_for_comms(True)
        return model
    return model


def grad_sync(model: nn.Module, d: Dist, enabled: bool):
    """Context manager: skip the gradient reduction on accumulation micro-steps that are not the last."""
    import contextlib
    if d.parallel == "ddp" and not enabled:
        return model.no_sync()
    if d.parallel == "fsdp":
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def loss_scale(d: Dist) -> float:
    """DDP averages gradients over ranks; multiplying the loss by the world size turns that into the SUM that a
    loss divided by the global token count needs. FSDP2 here already sums."""
    return float(d.world) if d.parallel == "ddp" else 1.0


def shutdown(d: Dist):
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
