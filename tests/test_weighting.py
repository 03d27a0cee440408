"""Loss weightings: their endpoints, their identities, and the "vlb" weight against the bound's KL."""

import math

import pytest
import torch

from minildm import diffusion as D
from minildm.likelihood import reverse_variance, vlb_term
from minildm.mlp import MLPConfig, MLPDenoiser
from minildm.schedules import cosine_schedule, linear_schedule
from minildm.train import train_denoiser
from minildm.weighting import WEIGHTINGS, loss_weight, x0_weight

PREDICTIONS = ["eps", "x0", "v"]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_simple_is_one_everywhere(prediction):
    s = linear_schedule(100)
    w = loss_weight(s, torch.arange(100), "simple", prediction)
    assert torch.equal(w, torch.ones(100, dtype=torch.float64))


def test_snr_weighting_is_l_simple_for_eps():
    """lambda_t = snr_t on the x0 error is a weight of 1 on the eps error (Hang et al. 2023)."""
    s = cosine_schedule(50)
    torch.testing.assert_close(loss_weight(s, torch.arange(50), "snr", "eps"), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(loss_weight(s, torch.arange(50), "snr", "x0"), s.snr)


def test_min_snr_at_its_endpoints():
    s = linear_schedule(1000)
    gamma = 5.0
    first, last = torch.tensor([0]), torch.tensor([999])
    snr0, snr_T = float(s.snr[0]), float(s.snr[-1])
    assert snr0 > gamma > snr_T  # the clip is active at t = 0 only
    assert float(loss_weight(s, first, "min_snr", "eps", gamma)) == pytest.approx(gamma / snr0)
    assert float(loss_weight(s, last, "min_snr", "eps", gamma)) == pytest.approx(1.0)
    assert float(loss_weight(s, first, "min_snr", "x0", gamma)) == pytest.approx(gamma)
    assert float(loss_weight(s, last, "min_snr", "x0", gamma)) == pytest.approx(snr_T)
    assert float(loss_weight(s, first, "min_snr", "v", gamma)) == pytest.approx(gamma / (1 + snr0))
    assert float(loss_weight(s, last, "min_snr", "v", gamma)) == pytest.approx(snr_T / (1 + snr_T))


def test_vlb_weight_is_ddpm_eq_12_for_eps():
    """DDPM eq. 12: L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) ||eps - eps_hat||^2."""
    s = linear_schedule(200)
    t = torch.arange(1, 200)
    beta, ab = s.betas[t], s.alpha_bar[t]
    sigma2 = reverse_variance(s, "posterior")[t]
    expected = beta**2 / (2 * sigma2 * (1 - beta) * (1 - ab))
    torch.testing.assert_close(loss_weight(s, t, "vlb", "eps"), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("t", [0, 1, 7, 99])
def test_vlb_weight_times_error_is_the_kl_term(prediction, t):
    """w_t ||target - pred||^2 summed over dimensions equals the bound's term L_{t-1}, computed
    independently as a Gaussian KL (t >= 1), or the decoder NLL up to its constant (t = 0)."""
    s = cosine_schedule(100)
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t_batch = torch.full((6,), t)
    xt = D.q_sample(x0, t_batch, eps, s)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.3

    def model(x, t):  # any function will do: the identity holds for every prediction
        return x @ W + 0.1

    term = vlb_term(model, x0, xt, t, s, prediction=prediction)
    err = (D.target(x0, eps, D.extract(s.alpha_bar, t_batch, x0), prediction) - model(xt, t_batch)).pow(2).sum(1)
    weighted = loss_weight(s, t_batch, "vlb", prediction) * err
    if t == 0:
        var0 = float(reverse_variance(s)[0])
        weighted = weighted + 3 / 2 * math.log(2 * math.pi * var0)
    torch.testing.assert_close(term, weighted, rtol=1e-7, atol=1e-9)


def test_vlb_x0_weight_is_half_the_snr_drop():
    """VDM (Kingma et al. 2021, eq. 13): the discrete-time bound weights the x0 error by (snr_{t-1} - snr_t) / 2."""
    s = linear_schedule(50)
    t = torch.arange(1, 50)
    torch.testing.assert_close(x0_weight(s, t, "vlb"), 0.5 * (s.snr[t - 1] - s.snr[t]))


def test_training_loss_default_is_unchanged():
    """The default is L_simple exactly as before: same draws from the generator, plain mean."""
    s = linear_schedule(100)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    model = MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=1))
    loss = D.training_loss(model, x0, s, "eps", torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (32,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    expected = (model(D.q_sample(x0, t, eps, s), t.float()) - eps).pow(2).mean()
    assert torch.equal(loss, expected)
    simple = D.training_loss(model, x0, s, "eps", torch.Generator().manual_seed(5), weighting="simple")
    assert torch.equal(simple, loss)
    snr = D.training_loss(model, x0, s, "eps", torch.Generator().manual_seed(5), weighting="snr")
    torch.testing.assert_close(snr, loss)  # w = 1 for eps prediction, by another code path


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_training_loss_is_the_weighted_mean(weighting):
    s = cosine_schedule(100)
    x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    model = MLPDenoiser(MLPConfig(dim=4, hidden=16, depth=1))
    loss = D.training_loss(model, x0, s, "v", torch.Generator().manual_seed(1), weighting=weighting, gamma=2.0)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 100, (16,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    v = D.v_from_x0_eps(x0, eps, D.extract(s.alpha_bar, t, x0))
    mse = (model(D.q_sample(x0, t, eps, s), t.float()) - v).pow(2).mean(1)
    expected = (loss_weight(s, t, weighting, "v", gamma=2.0).float() * mse).mean()
    torch.testing.assert_close(loss, expected)


def test_unknown_weighting_rejected():
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(linear_schedule(100), torch.arange(3), "p2")


def test_train_denoiser_passes_the_weighting_through():
    s = cosine_schedule(100)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def run(weighting):
        torch.manual_seed(0)
        model = MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=1))
        batches = iter(lambda: (x,), None)
        return train_denoiser(model, batches, s, 3, weighting=weighting,
                              generator=torch.Generator().manual_seed(0)).losses

    simple, min_snr = run("simple"), run("min_snr")
    assert simple != min_snr  # same draws, different weights
    assert run("simple") == simple


@pytest.mark.parametrize("weighting", ["vlb", "min_snr"])
def test_importance_sampling_keeps_the_objective(weighting):
    """Drawing t from p_t ~ w_t and weighting by w_t / (T p_t) estimates the same loss, here for the
    exact Gaussian denoiser, whose eps error at t is known: E||eps - E[eps|x_t]||^2 / dim = ab s2 / (ab s2 + 1 - ab)."""
    s = cosine_schedule(100)
    s2 = 0.25
    x0 = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s2**0.5

    def ideal(xt, t):
        return D.gaussian_eps(xt, D.extract(s.alpha_bar, t, xt), 0.0, s2)

    ab = s.alpha_bar
    expected = float((loss_weight(s, torch.arange(100), weighting) * ab * s2 / (ab * s2 + 1 - ab)).mean())
    for importance in (False, True):
        loss = D.training_loss(ideal, x0, s, generator=torch.Generator().manual_seed(1), weighting=weighting,
                               importance=importance)
        assert float(loss) == pytest.approx(expected, rel=0.03)
