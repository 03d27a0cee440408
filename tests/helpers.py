"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

import torch


def perturb_(module: torch.nn.Module, std: float) -> torch.nn.Module:
    """Add N(0, std^2) noise to every parameter, so zero-initialised layers stop being zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def write_config(tmp_path_factory, text: str) -> str:
    """A config file holding `text` in a fresh temporary folder; its path."""
    path = tmp_path_factory.mktemp("cfg") / "micro.py"
    path.write_text(text)
    return str(path)


def finished_run(tmp_path_factory, cfg: str, name: str) -> Path:
    """The run folder of `python -m minildm train cfg`, trained to its last step."""
    from minildm.__main__ import main
    run_dir = tmp_path_factory.mktemp(name) / "run"
    assert main(["train", cfg, f"--run_dir={run_dir}"]) == 0
    return run_dir
