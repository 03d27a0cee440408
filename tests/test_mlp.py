"""The MLP denoiser: shapes, batch independence, and that it learns a denoiser."""

import torch

from minildm.mlp import MLPConfig, MLPDenoiser


def test_shapes_for_points_and_images():
    assert MLPDenoiser(MLPConfig(dim=2))(torch.randn(5, 2), torch.rand(5) * 99).shape == (5, 2)
    net = MLPDenoiser(MLPConfig(dim=1 * 28 * 28, hidden=64))
    assert net(torch.randn(3, 1, 28, 28), torch.rand(3) * 99).shape == (3, 1, 28, 28)


def test_batch_independence():
    torch.manual_seed(0)
    net = MLPDenoiser(MLPConfig(dim=2)).eval()
    x, t = torch.randn(6, 2), torch.rand(6) * 99
    full = net(x, t)
    torch.testing.assert_close(net(x[2:3], t[2:3]), full[2:3], rtol=1e-5, atol=1e-6)


def test_output_depends_on_t():
    torch.manual_seed(0)
    net = MLPDenoiser(MLPConfig(dim=2))
    x = torch.randn(4, 2)
    assert not torch.allclose(net(x, torch.zeros(4)), net(x, torch.full((4,), 50.0)))
