"""The one call every lesson makes first: seeds, threads, figure style and device."""

from __future__ import annotations

import random

import matplotlib as mpl
import numpy as np
import torch


def pick_device() -> torch.device:
    """The fastest available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so that a lesson reruns identically."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0, device: str | None = None, threads: int | None = None) -> torch.device:
    """Seed everything, set a compact figure style, and return the device to use.

    The lessons pass device="cpu" so that their stored numbers are the ones a learner
    reproduces on a laptop; pass None to take the fastest device available.
    threads: CPU threads for PyTorch (None keeps its default). Tiny models (the 2-D MLPs)
    run faster on one thread: a step is too small to pay for synchronising two.
    """
    seed_everything(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    mpl.rcParams.update({
        "figure.dpi": 80,
        "savefig.dpi": 80,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "font.size": 9,
        "image.cmap": "gray",
    })
    return torch.device(device) if device is not None else pick_device()
