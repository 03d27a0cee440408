"""Tests for minildm.toy2d: the mixture density against scipy, and the samplers' scale."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from minildm import toy2d
from minildm.toy2d import GaussianMixture2D


def random_mixture(K: int = 3, seed: int = 0) -> GaussianMixture2D:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, 2, 2, generator=g, dtype=torch.float64)
    covs = A @ A.transpose(1, 2) + 0.1 * torch.eye(2, dtype=torch.float64)  # full, SPD
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    return GaussianMixture2D(torch.randn(K, 2, generator=g, dtype=torch.float64), covs, weights / weights.sum())


def scipy_log_prob(m: GaussianMixture2D, x: torch.Tensor) -> np.ndarray:
    comps = [multivariate_normal(mu.numpy(), cov.numpy()).logpdf(x.numpy()) for mu, cov in zip(m.means, m.covs)]
    return logsumexp(np.stack(comps, 1) + np.log(m.weights.numpy()), axis=1)


def test_log_prob_matches_scipy():
    m = random_mixture()
    x = torch.randn(500, 2, dtype=torch.float64) * 2
    np.testing.assert_allclose(m.log_prob(x).numpy(), scipy_log_prob(m, x), rtol=1e-10, atol=1e-10)
    m8 = toy2d.eight_gaussians()  # float32
    x = m8.sample(300, seed=1)
    np.testing.assert_allclose(m8.log_prob(x).numpy(), scipy_log_prob(m8, x), rtol=1e-4, atol=1e-4)


def test_density_integrates_to_one():
    for m in (toy2d.eight_gaussians(std=0.15), random_mixture(seed=1)):
        t = torch.linspace(-12, 12, 801, dtype=torch.float64)
        X, Y = torch.meshgrid(t, t, indexing="ij")
        p = m.log_prob(torch.stack([X.flatten(), Y.flatten()], 1).to(m.means.dtype)).exp()
        assert abs(p.double().sum().item() * (t[1] - t[0]).item() ** 2 - 1) < 1e-3


def test_sample_moments_match_the_mixture():
    m = random_mixture(seed=2)
    x = m.sample(200_000, seed=0)
    mean = (m.weights[:, None] * m.means).sum(0)
    second = (m.weights[:, None, None] * (m.covs + m.means[:, :, None] * m.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05 * cov.abs().max().item())


def test_score_and_noised_and_entropy_of_one_gaussian():
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    m = GaussianMixture2D(torch.tensor([[1.0, -1.0]], dtype=torch.float64), cov[None], torch.ones(1, dtype=torch.float64))
    x = torch.randn(10, 2, dtype=torch.float64)
    assert torch.allclose(m.score(x), -(x - m.means) @ torch.linalg.inv(cov))  # -Sigma^-1 (x - mu)
    noised = m.noised(0.5)
    assert torch.allclose(noised.covs[0], cov + 0.25 * torch.eye(2, dtype=torch.float64))
    np.testing.assert_allclose(noised.log_prob(x).numpy(), scipy_log_prob(noised, x), rtol=1e-10)
    exact = 1 + math.log(2 * math.pi) + 0.5 * torch.logdet(cov).item()  # entropy of a 2-D Gaussian
    assert abs(m.entropy_mc(200_000) - exact) < 0.01


def test_eight_gaussians_has_unit_variance():
    m = toy2d.eight_gaussians(std=0.2)
    assert m.means.shape == (8, 2) and m.covs.shape == (8, 2, 2)
    var = (m.means**2).mean(0) + 0.2**2  # per coordinate, the means averaging to 0
    assert torch.allclose(var, torch.ones(2), atol=1e-6)
    assert torch.allclose(m.means.mean(0), torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize("sampler", [toy2d.two_moons, toy2d.swiss_roll, toy2d.checkerboard,
                                     lambda n, seed: toy2d.eight_gaussians().sample(n, seed)])
def test_samplers_shape_scale_and_determinism(sampler):
    x = sampler(100_000, seed=0)
    assert x.shape == (100_000, 2) and x.dtype == torch.float32
    assert x.mean(0).abs().max() < 0.03
    assert abs(x.var(0).mean().item() - 1) < 0.03  # mean per-coordinate variance ~ 1
    assert torch.equal(sampler(100, seed=7), sampler(100, seed=7))
    assert not torch.equal(sampler(100, seed=7), sampler(100, seed=8))
    assert torch.equal(sampler(100, seed=torch.Generator().manual_seed(7)), sampler(100, seed=7))


def test_checkerboard_only_dark_squares():
    x = toy2d.checkerboard(10_000, seed=0) * math.sqrt(4 / 3)  # back to the [-2, 2]^2 board
    assert x.abs().max() <= 2
    cell = torch.floor(x).long() + 2  # (n, 2) column and row in 0..3
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cell.tolist()}) == 8


def test_noise_keeps_unit_variance():
    for noise in (0.0, 0.3):
        x = toy2d.two_moons(100_000, seed=1, noise=noise)
        assert abs(x.var(0).mean().item() - 1) < 0.03
