"""Schedules against closed forms and an independent NumPy computation."""

import math

import numpy as np
import pytest
import torch

from minildm import schedules as S


def test_linear_endpoints_match_ddpm():
    s = S.linear_schedule(1000)
    assert s.T == 1000
    assert float(s.betas[0]) == pytest.approx(1e-4)
    assert float(s.betas[-1]) == pytest.approx(0.02)
    # DDPM reports alpha_bar_T ~ 4e-5 for this schedule: x_T is nearly pure noise
    assert float(s.alpha_bar[-1]) == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-10)
    assert float(s.alpha_bar[-1]) < 1e-4


def test_linear_rescaled_for_short_chains():
    s = S.linear_schedule(100)
    assert float(s.betas[-1]) == pytest.approx(0.2)


@pytest.mark.parametrize("make", [S.linear_schedule, S.cosine_schedule, S.sigmoid_schedule])
def test_derived_quantities_agree_with_numpy(make):
    s = make(200)
    betas = s.betas.numpy()
    ab = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alpha_bar.numpy(), ab, rtol=1e-12)
    np.testing.assert_allclose(s.alpha_bar_prev.numpy(), np.concatenate([[1.0], ab[:-1]]), rtol=1e-12)
    np.testing.assert_allclose(s.snr.numpy(), ab / (1 - ab), rtol=1e-10)
    np.testing.assert_allclose(s.log_snr.numpy(), np.log(ab / (1 - ab)), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(s.sigmas.numpy(), np.sqrt((1 - ab) / ab), rtol=1e-10)
    assert (np.diff(ab) < 0).all(), "alpha_bar must decrease"


def test_cosine_discrete_follows_continuous():
    T = 1000
    s = S.cosine_schedule(T)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    cont = S.alpha_bar_cosine(t)
    # equal until the max_beta clipping bites in the very last steps
    torch.testing.assert_close(s.alpha_bar[:-5], cont[:-5], rtol=1e-9, atol=1e-12)
    assert float(s.betas.max()) <= 0.999


def test_continuous_endpoints():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(S.alpha_bar_cosine(t), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(S.alpha_bar_sigmoid(t), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    assert float(S.alpha_bar_linear(t)[0]) == 1.0
    assert float(S.alpha_bar_linear(t)[1]) == pytest.approx(math.exp(-(0.1 + 0.5 * 19.9)))


def test_continuous_linear_matches_discrete_ddpm():
    s = S.linear_schedule(1000)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    # the VP SDE is the T -> infinity limit of DDPM's chain: close, not equal
    torch.testing.assert_close(S.alpha_bar_linear(t), s.alpha_bar, rtol=0.02, atol=1e-4)


def test_alpha_bar_at_interpolates_log_snr():
    s = S.cosine_schedule(100)
    t = torch.arange(100, dtype=torch.float64)
    torch.testing.assert_close(s.alpha_bar_at(t), s.alpha_bar, rtol=1e-10, atol=1e-14)
    mid = s.alpha_bar_at(torch.tensor([10.5], dtype=torch.float64))
    expected = torch.sigmoid((s.log_snr[10] + s.log_snr[11]) / 2)
    torch.testing.assert_close(mid, expected.reshape(1))
    fine = s.alpha_bar_at(torch.linspace(0, 99, 1000, dtype=torch.float64))
    assert (fine.diff() < 0).all()


def test_snr_and_log_snr_consistent():
    ab = torch.tensor([0.999, 0.5, 1e-3], dtype=torch.float64)
    torch.testing.assert_close(S.log_snr(ab), torch.log(S.snr(ab)))
    assert float(S.snr(ab)[1]) == pytest.approx(1.0)


def test_too_short_linear_chain_rejected():
    with pytest.raises(ValueError, match="use more steps or cosine_schedule"):
        S.linear_schedule(10)


def test_invalid_betas_rejected():
    with pytest.raises(ValueError, match="between 0 and 1"):
        S.Schedule(torch.tensor([0.1, 1.0], dtype=torch.float64))
