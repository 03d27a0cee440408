"""The lesson set-up call: seeding makes random draws repeat; the device is usable."""

import numpy as np
import torch

from minildm.course import pick_device, setup


def test_setup_seeds_every_generator():
    setup(seed=3, device="cpu")
    a = (torch.rand(3), np.random.rand(3))
    setup(seed=3, device="cpu")
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_device_choice():
    assert setup(device="cpu") == torch.device("cpu")
    torch.zeros(1, device=pick_device())  # the picked device can hold a tensor
