"""Sample grids of a run (minildm.monitor.save_png): what is written, and that it is written atomically."""

import torch
from PIL import Image

from minildm.monitor import save_png


def test_grid_png_has_the_grid_size_and_the_pixel_values(tmp_path):
    x = torch.linspace(-1, 1, 6 * 3 * 8 * 8).view(6, 3, 8, 8)
    path = tmp_path / "step_000010.png"
    save_png(x, path, nrow=3)
    img = Image.open(path)
    assert img.mode == "RGB" and img.size[0] > 3 * 8 and img.size[1] > 2 * 8  # 3 x 2 tiles plus padding
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010.png"]  # no temporary file left


def test_grey_images_give_a_grey_png(tmp_path):
    save_png(torch.full((4, 1, 8, 8), -1.0), tmp_path / "g.png", nrow=2)
    img = Image.open(tmp_path / "g.png")
    assert img.mode == "L" and img.getextrema()[0] == 0
