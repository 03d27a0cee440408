"""Devices, processes and seeds of a training run (`minildm.runner`).

One process per GPU under torchrun: `setup_rank` reads WORLD_SIZE / LOCAL_RANK, picks the
device (cuda, then mps, then cpu) and joins the process group (nccl on GPUs, gloo on CPUs).
`seed_for(seed, step, ...)` mixes integers into one seed, so that everything random at a
step is a function of (seed, step) and a resumed run draws the same numbers.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from minildm.config import ConfigError, TrainConfig


@dataclass
class Rank:
    """Where this process sits in a (possibly one-process) run."""

    rank: int  # global rank; 0 logs and writes checkpoints
    world: int  # number of processes
    device: torch.device  # this process's device


# ----------------------------------------------------------------------------------------
# devices, processes and seeds

def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """cuda (this process's GPU), then mps, then cpu, unless `choice` names one."""
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if choice in ("auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    if choice not in ("auto", "cpu"):
        raise ConfigError(f"device={choice} is not available here; use --device=auto")
    return torch.device("cpu")


def setup_rank(config: TrainConfig) -> Rank:
    """Join the torchrun process group if WORLD_SIZE > 1 (nccl on GPUs, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(config.device, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Rank(rank=dist.get_rank() if world > 1 else 0, world=world, device=device)


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([p + 1 for p in parts]).generate_state(2, np.uint64)[0] >> 1)



def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

