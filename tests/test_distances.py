"""Sample-based distances against scipy and brute force."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from minildm.distances import median_bandwidth, mmd, sliced_wasserstein, wasserstein_1d


@pytest.mark.parametrize("n,m", [(50, 50), (37, 90), (1, 5)])
def test_wasserstein_1d_matches_scipy(n, m):
    g = torch.Generator().manual_seed(n + m)
    x, y = torch.randn(n, generator=g), torch.rand(m, generator=g) * 3
    expected = stats.wasserstein_distance(x.numpy(), y.numpy())
    assert float(wasserstein_1d(x, y, p=1)) == pytest.approx(expected, rel=1e-6)


def test_wasserstein_2_equal_sizes_is_the_sorted_matching():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, generator=g), torch.randn(64, generator=g) + 0.5
    expected = math.sqrt(float(((x.sort().values - y.sort().values) ** 2).mean()))
    assert float(wasserstein_1d(x, y, p=2)) == pytest.approx(expected, rel=1e-6)


def test_wasserstein_1d_batched_rows_are_independent():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 20, generator=g), torch.randn(3, 30, generator=g)
    batched = wasserstein_1d(x, y, p=2)
    for i in range(3):
        assert float(batched[i]) == pytest.approx(float(wasserstein_1d(x[i], y[i], p=2)), rel=1e-12)


def test_sliced_wasserstein_in_1d_is_wasserstein():
    """On the line every direction is +1 or -1, and W_p is symmetric under reflection."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 1, generator=g), torch.randn(55, 1, generator=g) * 2
    assert float(sliced_wasserstein(x, y, p=1)) == pytest.approx(
        stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy()), rel=1e-6)


def test_sliced_wasserstein_of_a_shift():
    """y = x + c: every projection is shifted by theta.c, so SW_2^2 = E (theta.c)^2 = |c|^2 / d."""
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    c = torch.tensor([0.6, -0.8])
    sw = sliced_wasserstein(x, x + c, n_projections=4000)
    assert float(sw) == pytest.approx(1 / math.sqrt(2), rel=0.03)
    assert float(sliced_wasserstein(x, x.clone())) == pytest.approx(0.0, abs=1e-12)


def test_mmd_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 2, generator=g), torch.randn(9, 2, generator=g) + 1
    h = 0.7
    xn, yn = x.double().numpy(), y.double().numpy()

    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * h**2))

    kxx = sum(k(a, b) for a in xn for b in xn) / len(xn) ** 2
    kyy = sum(k(a, b) for a in yn for b in yn) / len(yn) ** 2
    kxy = sum(k(a, b) for a in xn for b in yn) / (len(xn) * len(yn))
    assert float(mmd(x, y, bandwidth=h)) == pytest.approx(math.sqrt(kxx + kyy - 2 * kxy), rel=1e-9)
    assert float(mmd(x, x, bandwidth=h)) == pytest.approx(0.0, abs=1e-6)


def test_median_bandwidth():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 3.0]])
    # distances: 1, 3, sqrt(10) -> median 3
    assert median_bandwidth(x, y) == pytest.approx(3.0)
