"""2-D toy distributions for the first lessons: points you can plot, and (for the Gaussian
mixture) an exact density to compare a model against.

Every sampler returns (n, 2) float32, deterministic given `seed` (an int or a
torch.Generator). Scale: each distribution is centred and scaled by ONE factor for both
axes (so its shape is kept) such that the mean per-coordinate variance is 1, i.e. trace of
the covariance = 2. Samplers with `noise` add N(0, noise^2 I) in those units and divide by
sqrt(1 + noise^2), which keeps that variance at 1. Samples are not clipped to [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Seed = int | torch.Generator


def _generator(seed: Seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


@dataclass
class GaussianMixture2D:
    """p(x) = sum_k weights[k] N(x; means[k], covs[k]) in 2-D, with exact sampling and density."""

    means: Tensor  # (K, 2)
    covs: Tensor  # (K, 2, 2) symmetric positive definite
    weights: Tensor  # (K,) non-negative, summing to 1

    def sample(self, n: int, seed: Seed = 0) -> Tensor:
        """Draw n points (n, 2): a component k ~ weights, then means[k] + L_k z, z ~ N(0, I)."""
        g = _generator(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)  # (n,)
        z = torch.randn(n, 2, 1, generator=g, dtype=self.means.dtype)
        L = torch.linalg.cholesky(self.covs)  # (K, 2, 2)
        return self.means[k] + (L[k] @ z).squeeze(-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) for x (n, 2) -> (n,), by logsumexp over the components."""
        L = torch.linalg.cholesky(self.covs)  # (K, 2, 2)
        diff = (x[:, None, :] - self.means).unsqueeze(-1)  # (n, K, 2, 1)
        z = torch.linalg.solve_triangular(L, diff, upper=False).squeeze(-1)  # (n, K, 2)
        log_det = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        log_normal = -0.5 * (z**2).sum(-1) - 0.5 * log_det - math.log(2 * math.pi)  # (n, K)
        return torch.logsumexp(torch.log(self.weights) + log_normal, dim=1)

    def score(self, x: Tensor) -> Tensor:
        """Exact score grad_x log p(x) for x (n, 2) -> (n, 2), by autograd."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.log_prob(x).sum(), x)[0]

    def noised(self, sigma: float) -> GaussianMixture2D:
        """The law of x + sigma * eps, eps ~ N(0, I): the same mixture with covs + sigma^2 I.
        This is the exact marginal of a variance-exploding diffusion at noise level sigma."""
        eye = torch.eye(2, dtype=self.covs.dtype)
        return GaussianMixture2D(self.means, self.covs + sigma**2 * eye, self.weights)

    def entropy_mc(self, n: int = 100_000, seed: Seed = 0) -> float:
        """Monte Carlo estimate of the entropy H = -E[log p(x)] in nats (no closed form)."""
        return -self.log_prob(self.sample(n, seed)).mean().item()


def eight_gaussians(std: float = 0.15) -> GaussianMixture2D:
    """The default mixture: 8 equally weighted isotropic Gaussians with standard deviation
    `std`, evenly spaced on a circle of radius sqrt(2 (1 - std^2)) so that each coordinate
    has variance exactly 1 (radius^2 / 2 + std^2 = 1)."""
    radius = math.sqrt(2 * (1 - std**2))
    angles = torch.arange(8) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # (8, 2)
    covs = std**2 * torch.eye(2).expand(8, 2, 2).clone()  # (8, 2, 2)
    return GaussianMixture2D(means, covs, torch.full((8,), 1 / 8))


def _standardise_curve(
    curve: Callable[[Tensor], Tensor], u: Tensor, noise: float, g: torch.Generator
) -> Tensor:
    """Evaluate curve(u) (n, 2) for u ~ U[0, 1), centre and scale it by constants computed
    once from the noiseless curve (midpoint rule on 2^16 points, so they do not depend on the
    sample), then add noise in those units and rescale by 1 / sqrt(1 + noise^2)."""
    grid = curve((torch.arange(2**16, dtype=torch.float64) + 0.5) / 2**16)  # (65536, 2)
    mean, scale = grid.mean(0), grid.var(0, unbiased=False).mean().sqrt()
    x = (curve(u.double()) - mean) / scale
    x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return (x / math.sqrt(1 + noise**2)).float()


def _moons(u: Tensor) -> Tensor:
    """u in [0, 1/2): upper moon (cos t, sin t); u in [1/2, 1): lower (1 - cos t, 1/2 - sin t)."""
    lower = u >= 0.5
    t = math.pi * torch.where(lower, 2 * u - 1, 2 * u)  # t in [0, pi)
    x = torch.where(lower, 1 - torch.cos(t), torch.cos(t))
    y = torch.where(lower, 0.5 - torch.sin(t), torch.sin(t))
    return torch.stack([x, y], dim=1)


def two_moons(n: int, seed: Seed = 0, noise: float = 0.1) -> Tensor:
    """Two interleaving half circles (as sklearn's make_moons, but with uniform random
    positions along each moon), n points (n, 2), half on each moon in expectation."""
    g = _generator(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return _standardise_curve(_moons, u, noise, g)


def _swiss_roll(u: Tensor) -> Tensor:
    """The 2-D swiss roll of sklearn: t = 1.5 pi (1 + 2u), point t (cos t, sin t)."""
    t = 1.5 * math.pi * (1 + 2 * u)
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)


def swiss_roll(n: int, seed: Seed = 0, noise: float = 0.05) -> Tensor:
    """A 2-D spiral, n points (n, 2), uniform in the angle parameter (so denser near the centre)."""
    g = _generator(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return _standardise_curve(_swiss_roll, u, noise, g)


def checkerboard(n: int, seed: Seed = 0) -> Tensor:
    """Uniform on the 8 dark squares of a 4x4 checkerboard, n points (n, 2). The board spans
    [-2, 2]^2 / sqrt(4/3), since a uniform variable on [-2, 2] has variance 4/3."""
    g = _generator(seed)
    col = torch.randint(4, (n,), generator=g)
    row = 2 * torch.randint(2, (n,), generator=g) + col % 2  # the dark square of that column
    corner = torch.stack([col, row], dim=1).float() - 2  # (n, 2) lower-left corner in [-2, 1]
    return (corner + torch.rand(n, 2, generator=g)) / math.sqrt(4 / 3)
