"""Distances between two point clouds, for judging samples when no density is at hand.

A likelihood says how well a model covers the data; a sample-based distance says how close
its samples are to the data. Both here are computed from samples alone, x (n, d) and y (m, d):

- `wasserstein_1d`: the exact p-Wasserstein distance between two empirical distributions on
  the line, W_p^p = int_0^1 |F^-1(u) - G^-1(u)|^p du (quantile functions; Villani 2003, thm 2.18).
- `sliced_wasserstein`: its average over random directions, SW_p^p = E_theta W_p^p(theta.x, theta.y)
  (Rabin et al. 2011; Bonneel et al. 2015), a cheap metric in any dimension.
- `mmd`: the maximum mean discrepancy with a Gaussian kernel (Gretton et al. 2012, eq. 5).
"""

from __future__ import annotations

import torch
from torch import Tensor


def wasserstein_1d(x: Tensor, y: Tensor, p: float = 1.0) -> Tensor:
    """W_p between the empirical distributions of x (..., n) and y (..., m) along the last axis.

    The quantile functions are step functions; between consecutive levels of the merged grid
    {i / n} U {j / m} both are constant, so the integral is an exact finite sum.
    """
    n, m = x.shape[-1], y.shape[-1]
    xs, ys = torch.sort(x.double(), dim=-1).values, torch.sort(y.double(), dim=-1).values
    u = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
    u = torch.unique(torch.cat([u.new_zeros(1), u]))  # sorted levels 0 = u_0 < ... < u_K = 1
    mid, du = (u[1:] + u[:-1]) / 2, u[1:] - u[:-1]  # (K,)
    ix = (mid * n).long().clamp(max=n - 1).to(x.device)  # F^-1 on (u_{k-1}, u_k] is xs[ceil(u n) - 1]
    iy = (mid * m).long().clamp(max=m - 1).to(x.device)
    cost = (xs[..., ix] - ys[..., iy]).abs() ** p  # (..., K)
    return (cost * du.to(x.device)).sum(-1) ** (1 / p)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, p: float = 2.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """SW_p between point clouds x (n, d) and y (m, d): W_p^p averaged over `n_projections`
    directions drawn uniformly on the sphere (from `generator`; a fresh one seeded 0 if None)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    theta = torch.randn(n_projections, x.shape[1], generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(x.device)  # (P, d)
    w = wasserstein_1d(theta @ x.double().T, theta @ y.double().T, p)  # (P,)
    return (w**p).mean() ** (1 / p)


def median_bandwidth(x: Tensor, y: Tensor, max_points: int = 1000) -> float:
    """The median heuristic: the median distance between distinct points of x and y pooled
    (the first max_points / 2 of each, to keep it cheap)."""
    z = torch.cat([x[: max_points // 2], y[: max_points // 2]]).double()
    d = torch.cdist(z, z)
    return float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)].median())


def mmd(x: Tensor, y: Tensor, bandwidth: float | None = None) -> Tensor:
    """MMD between x (n, d) and y (m, d) with k(a, b) = exp(-|a - b|^2 / (2 h^2)), h = bandwidth
    (the median heuristic if None): the square root of the biased estimate (Gretton et al. 2012, eq. 5)

        MMD_b^2 = mean k(x_i, x_j) + mean k(y_i, y_j) - 2 mean k(x_i, y_j) >= 0.
    """
    h = median_bandwidth(x, y) if bandwidth is None else bandwidth
    x, y = x.double(), y.double()

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b) ** 2 / (2 * h**2)).mean()

    return (k(x, x) + k(y, y) - 2 * k(x, y)).clamp(min=0).sqrt()
