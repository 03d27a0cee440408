"""Device choice and seeding of a run (minildm.distributed); the process group itself is
tested end to end by the two-process gloo runs in test_runner.py and test_cli_stages.py."""

import pytest
import torch

from minildm.config import ConfigError
from minildm.distributed import pick_device, seed_for


def test_cpu_is_always_available_and_auto_falls_back_to_it():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_a_missing_device_names_the_fix():
    with pytest.raises(ConfigError, match="device=cuda is not available here; use --device=auto"):
        pick_device("cuda")


def test_seed_for_is_deterministic_distinct_and_fits_a_generator():
    seeds = {seed_for(run, rank) for run in range(10) for rank in range(8)}
    assert len(seeds) == 80  # distinct per (run, rank)
    assert seed_for(3, 1) == seed_for(3, 1) and seed_for(3, 1) != seed_for(1, 3)  # order matters
    assert all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))  # a valid torch seed
