"""Plot helpers produce the figures the lessons rely on (checked on their data, not pixels)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch

from minildm import plotting


def test_to_image_maps_range_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 3)
    np.testing.assert_allclose(plotting.to_image(x), [[0.0, 0.5, 1.0]])
    rgb = torch.zeros(3, 2, 2)
    assert plotting.to_image(rgb).shape == (2, 2, 3)


def test_make_grid_places_every_image():
    x = torch.arange(5).float().reshape(5, 1, 1, 1).expand(5, 1, 2, 2) / 10
    grid = plotting.make_grid(x, nrow=3, pad=1)
    assert grid.shape == (1, 2 * 3 + 1, 3 * 3 + 1)
    assert float(grid[0, 1, 1]) == 0.0 and float(grid[0, 4, 4]) == float(x[4, 0, 0, 0])  # image 4: row 1, col 1
    assert float(grid[0, 0, 0]) == 1.0  # padding is white


def test_figures_render():
    plotting.show_images(torch.rand(6, 3, 8, 8) * 2 - 1, nrow=3, title="grid")
    plotting.noising_strip([torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)], ["a", "b"])
    ax = plotting.scatter2d(torch.randn(50, 2))
    assert len(ax.collections) == 1
    plotting.density2d(lambda x: -0.5 * (x**2).sum(1), n=20)
    plotting.trajectories2d(torch.randn(5, 10, 2))
    plt.close("all")


def test_animate_returns_a_gif():
    fig, ax = plt.subplots()
    line, = ax.plot([0, 1], [0, 1])
    gif = plotting.animate(fig, lambda i: line.set_ydata([0, i]), frames=3)
    assert gif[:6] in (b"GIF87a", b"GIF89a")
