"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import torch


def perturb_(module: torch.nn.Module, std: float) -> torch.nn.Module:
    """Add N(0, std^2) noise to every parameter, so zero-initialised layers stop being zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module
