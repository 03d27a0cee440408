"""A multilayer-perceptron denoiser: the simplest network that can run the reverse process.

It sees its input as a flat vector, so it knows nothing of images: it is the baseline
lesson 01 trains on 2-D points and lesson 03 compares against the UNet on digits.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from minildm.nn import timestep_embedding


@dataclass
class MLPConfig:
    dim: int  # size of one flattened input: 2 for toy2d points, C * H * W for images
    hidden: int = 128  # width of every hidden layer
    depth: int = 3  # number of hidden layers
    t_dim: int = 32  # size of the sinusoidal embedding of t


class MLPDenoiser(nn.Module):
    """model(xt, t) -> prediction of the same shape as xt, for any xt of shape (B, *dims)."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        c = config
        self.t_mlp = nn.Sequential(nn.Linear(c.t_dim, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))
        self.inp = nn.Linear(c.dim, c.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(c.hidden), nn.Linear(c.hidden, c.hidden), nn.SiLU()) for _ in range(c.depth)
        )
        self.out = nn.Linear(c.hidden, c.dim)

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        B = xt.shape[0]
        h = self.inp(xt.reshape(B, -1))  # (B, hidden)
        emb = self.t_mlp(timestep_embedding(t, self.config.t_dim))  # (B, hidden)
        for block in self.blocks:
            h = h + block(h + emb)  # residual blocks, t added at every depth
        return self.out(h).reshape(xt.shape)
