"""The bound's terms against closed forms, the ODE likelihood of the exact Gaussian denoiser
against the analytic density, units, and evaluation hygiene."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Normal, kl_divergence

from minildm import likelihood as L
from minildm.diffusion import broadcast, gaussian_eps
from minildm.mlp import MLPConfig, MLPDenoiser
from minildm.schedules import cosine_schedule, linear_schedule


# ----------------------------------------------------------------------------------------
# building blocks


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(20, generator=g, dtype=torch.float64) + 0.1, torch.rand(20, generator=g, dtype=torch.float64) + 0.1
    expected = kl_divergence(Normal(m1, v1.sqrt()), Normal(m2, v2.sqrt()))
    torch.testing.assert_close(L.normal_kl(m1, v1, m2, v2), expected)


def test_gaussian_log_likelihood_matches_torch():
    x, mean = torch.linspace(-3, 3, 11, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    torch.testing.assert_close(L.gaussian_log_likelihood(x, mean, 0.3), Normal(mean, math.sqrt(0.3)).log_prob(x))


@pytest.mark.parametrize("mean,var", [(0.0, 1e-4), (0.3, 0.05), (-0.999, 1e-6), (2.5, 0.01), (0.0, 100.0)])
def test_discretized_decoder_sums_to_one(mean, var):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every 8-bit level in [-1, 1]
    log_p = L.discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64), var)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert float(torch.logsumexp(log_p, 0).exp()) == pytest.approx(1.0, abs=1e-12)


def test_discretized_decoder_matches_scipy_bins():
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean, std = 0.2, 0.1
    log_p = L.discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64), std**2)
    edges = np.concatenate([[-np.inf], (x.numpy()[:-1] + x.numpy()[1:]) / 2, [np.inf]])
    expected = np.diff(stats.norm.cdf(edges, mean, std))
    keep = expected > 1e-8  # scipy's differences of CDFs lose digits further out
    np.testing.assert_allclose(log_p.numpy()[keep], np.log(expected[keep]), rtol=1e-6)


def test_discretized_decoder_far_tail_stays_accurate():
    """A bin 40 standard deviations from the mean: naive CDF differences would give log(0)."""
    x, mean, std = torch.tensor([0.0], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64), 0.01
    log_p = L.discretized_gaussian_log_likelihood(x, mean, std**2)
    lo, hi = (0.0 - 1 / 255 + 0.4) / std, (0.0 + 1 / 255 + 0.4) / std
    # log(sf(lo) - sf(hi)) = log sf(lo) + log(1 - sf(hi) / sf(lo)), both from scipy's logsf
    expected = stats.norm.logsf(lo) + np.log1p(-np.exp(stats.norm.logsf(hi) - stats.norm.logsf(lo)))
    assert float(log_p) == pytest.approx(expected, rel=1e-9)


def test_prior_kl_closed_form():
    s = linear_schedule(1000)
    x0 = torch.tensor([[1.0, -1.0], [0.0, 0.5]], dtype=torch.float64)
    ab = float(s.alpha_bar[-1])
    expected = kl_divergence(Normal(math.sqrt(ab) * x0, math.sqrt(1 - ab)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(L.prior_kl(x0, s), expected)
    assert float(L.prior_kl(x0, s).max()) < 1e-4  # DDPM: L_T ~ 0, x_T is nearly pure noise


def test_reverse_variance():
    s = linear_schedule(100)
    beta_tilde = (1 - s.alpha_bar_prev) / (1 - s.alpha_bar) * s.betas
    post, beta = L.reverse_variance(s, "posterior"), L.reverse_variance(s, "beta")
    torch.testing.assert_close(post[1:], beta_tilde[1:])
    torch.testing.assert_close(beta[1:], s.betas[1:])
    assert float(post[0]) == float(beta[0]) == float(beta_tilde[1])  # the decoder's variance


# ----------------------------------------------------------------------------------------
# units


def test_bits_per_dim():
    assert L.bits_per_dim(3 * math.log(2), 3) == pytest.approx(1.0)
    assert L.bits_per_dim(torch.tensor([784 * math.log(2) * 2.5]), 784).item() == pytest.approx(2.5)


def test_dequantization_offset_constants():
    """7 bits/dim for 8-bit data scaled to [-1, 1], 8 for [0, 1] (Song et al. 2021's code)."""
    assert L.bits_per_dim(L.dequantization_offset(10), 10) == pytest.approx(7.0)
    assert L.bits_per_dim(L.dequantization_offset(10, data_range=1.0), 10) == pytest.approx(8.0)
    assert L.dequantization_offset(1) == pytest.approx(math.log(128))


def test_dequantized_uniform_density_gives_the_exact_discrete_nll():
    """The uniform density on [-1, 1]^D has -log p = D log 2; with the offset that is D log 256,
    exactly the NLL of the uniform distribution over 256^D 8-bit images."""
    D = 5
    assert D * math.log(2) + L.dequantization_offset(D) == pytest.approx(D * math.log(256))


def test_dequantize_stays_in_its_bin():
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (1000,), generator=g)
    x = k.double() / 127.5 - 1
    z = L.dequantize(x, g)
    assert torch.equal(torch.floor((z + 1) / 2 * 256).long(), k)
    assert float(z.min()) >= -1 and float(z.max()) < 1


def test_dequantized_continuous_nll_bounds_the_discrete_nll():
    """Jensen: -log P(bin) <= E_u[-log p(x + u)] + offset, with near equality for a smooth density.
    The bins are dequantization's: [2k / 256 - 1, 2 (k + 1) / 256 - 1) for level k."""
    g = torch.Generator().manual_seed(1)
    mean, std = 0.1, 0.45
    k = torch.arange(256, dtype=torch.float64)
    discrete = -torch.log(Normal(mean, std).cdf(2 * (k + 1) / 256 - 1) - Normal(mean, std).cdf(2 * k / 256 - 1))
    z = L.dequantize((k / 127.5 - 1).expand(20_000, -1), g)
    continuous = -L.gaussian_log_likelihood(z, torch.tensor(mean, dtype=torch.float64), std**2).mean(0)
    bound = continuous + L.dequantization_offset(1)
    assert (discrete <= bound + 3e-4).all()  # up to Monte Carlo error
    torch.testing.assert_close(bound, discrete, atol=3e-3, rtol=0)


# ----------------------------------------------------------------------------------------
# the variational bound with the exact denoiser for Gaussian data

MU, VAR = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.25, 0.04], dtype=torch.float64)


def ideal(schedule):
    def model(xt, t):
        return gaussian_eps(xt, broadcast(schedule.alpha_bar_at(t), xt), MU.to(xt.dtype), VAR.to(xt.dtype))

    return model


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_vlb_terms_match_their_expectation(variance):
    """With x0_hat = E[x0 | x_t], E KL = (log(s2 / bt) + (bt + c^2 Var[x0 | x_t]) / s2 - 1) / 2 per
    dimension, where bt = beta_tilde_t, s2 the reverse variance, c the posterior mean's x0 coefficient."""
    s = linear_schedule(100)
    x0 = MU + VAR.sqrt() * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    terms = L.vlb_terms(ideal(s), x0, s, variance=variance, generator=torch.Generator().manual_seed(1))
    assert terms.diffusion.shape == (20_000, 99)
    ab, ab_prev, beta = s.alpha_bar, s.alpha_bar_prev, s.betas
    bt = (1 - ab_prev) / (1 - ab) * beta
    s2 = L.reverse_variance(s, variance)
    for t in (1, 5, 50, 99):
        c = ab_prev[t].sqrt() * beta[t] / (1 - ab[t])
        var_x0 = VAR * (1 - ab[t]) / (ab[t] * VAR + 1 - ab[t])
        expected = 0.5 * (torch.log(s2[t] / bt[t]) + (bt[t] + c**2 * var_x0) / s2[t] - 1).sum()
        measured = terms.diffusion[:, t - 1]
        se = float(measured.std()) / math.sqrt(len(measured))
        assert abs(float(measured.mean()) - float(expected)) < 4 * se + 1e-9


def test_elbo_matches_its_closed_form_and_bounds_the_true_nll():
    """For Gaussian data and the exact x0_hat every term's expectation is closed form; their sum
    exceeds the entropy (the true NLL): the fixed reverse variances cost nats, mostly at small t."""
    s = linear_schedule(200)
    x0 = MU + VAR.sqrt() * torch.randn(5000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    terms = L.vlb_terms(ideal(s), x0, s, batch_size=2500)
    ab, ab_prev, beta = s.alpha_bar, s.alpha_bar_prev, s.betas
    s2 = L.reverse_variance(s)
    var_x0 = VAR * (1 - ab[:, None]) / (ab[:, None] * VAR + 1 - ab[:, None])  # (T, 2): Var[x0 | x_t]
    c2 = ab_prev * beta**2 / (1 - ab) ** 2
    kl = 0.5 * c2[1:, None] * var_x0[1:] / s2[1:, None]  # (T-1, 2), posterior variance: no log term
    decoder = 0.5 * torch.log(2 * math.pi * s2[0]) + var_x0[0] / (2 * s2[0])
    prior = 0.5 * (ab[-1] * (MU**2 + VAR) - ab[-1] - torch.log(1 - ab[-1]))
    expected = float(kl.sum() + decoder.sum() + prior.sum())
    se = float(terms.total.std()) / math.sqrt(len(x0))
    assert abs(float(terms.total.mean()) - expected) < 4 * se
    entropy = float(0.5 * torch.log(2 * math.pi * math.e * VAR).sum())
    assert expected - entropy > 0.5  # a loose bound for T = 200 with fixed variances
    true_nll = -stats.multivariate_normal(MU.numpy(), np.diag(VAR.numpy())).logpdf(x0.numpy())
    assert float(terms.total.mean()) > true_nll.mean() + 4 * se


# ----------------------------------------------------------------------------------------
# the exact likelihood through the probability-flow ODE

ROT = torch.tensor([[math.cos(0.6), -math.sin(0.6)], [math.sin(0.6), math.cos(0.6)]], dtype=torch.float64)
COV = ROT @ torch.diag(torch.tensor([0.5, 0.02], dtype=torch.float64)) @ ROT.T  # correlated: a non-diagonal Jacobian


def ideal_full_cov(schedule):
    """E[eps | x_t] = sqrt(1 - ab) (ab COV + (1 - ab) I)^-1 (x_t - sqrt(ab) MU) for x0 ~ N(MU, COV)."""

    def model(xt, t):
        ab = schedule.alpha_bar_at(t[:1]).to(xt.dtype)
        cov_t = ab * COV.to(xt.dtype) + (1 - ab) * torch.eye(2, dtype=xt.dtype)
        return torch.linalg.solve(cov_t, (xt - ab.sqrt() * MU.to(xt.dtype)).T).T * (1 - ab).sqrt()

    return model


def marginal(schedule, s):
    """q at fractional index s: N(sqrt(ab) MU, ab COV + (1 - ab) I), as scipy's distribution."""
    ab = float(schedule.alpha_bar_at(torch.tensor([float(s)])))
    return stats.multivariate_normal(math.sqrt(ab) * MU.numpy(), ab * COV.numpy() + (1 - ab) * np.eye(2))


@pytest.mark.parametrize("make,method", [(linear_schedule, "rk45"), (cosine_schedule, "rk45"), (linear_schedule, "rk4")])
def test_ode_nll_exact_trace_matches_analytic_density(make, method):
    """The ODE transports q exactly when the denoiser is exact: replacing the model's N(0, I) prior by
    the true q at s = T-1, -log p(x) is the analytic -log q_0(x) (s = 0 is one noising step from the data)."""
    s = make(1000)
    x = (MU + torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) @ torch.linalg.cholesky(COV).T).float()
    out = L.ode_nll(ideal_full_cov(s), x, s, method=method, steps=200, rtol=1e-6, atol=1e-6)
    exact_prior = torch.from_numpy(marginal(s, s.T - 1).logpdf(out.z.double().numpy()))
    expected = -marginal(s, 0).logpdf(x.double().numpy())
    np.testing.assert_allclose((-(exact_prior + out.delta_logp)).numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(out.nll.numpy(), expected, atol=0.05)  # with the N(0, I) prior: close
    torch.testing.assert_close(out.nll, -(out.prior_logp + out.delta_logp))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_ode_nll_hutchinson_is_unbiased(probe):
    s = cosine_schedule(100)
    x = torch.tensor([[1.3, -1.7]]).repeat(48, 1)
    exact = L.ode_nll(ideal_full_cov(s), x[:1], s, method="rk4", steps=40).nll
    est = L.ode_nll(ideal_full_cov(s), x, s, trace="hutchinson", probe=probe, method="rk4", steps=40,
                    generator=torch.Generator().manual_seed(4)).nll
    se = float(est.std()) / math.sqrt(len(est))
    assert se > 1e-3  # the off-diagonal Jacobian makes single probes noisy...
    assert abs(float(est.mean() - exact)) < 4 * se  # ...but right on average


def test_evaluation_leaves_the_model_and_rng_alone():
    s = cosine_schedule(20)
    torch.manual_seed(0)
    model = MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    L.vlb_terms(model, x, s)
    L.ode_nll(model, x, s, method="rk4", steps=5)
    L.ode_nll(model, x, s, trace="hutchinson", method="euler", steps=5)
    L.ode_decoder_nll(model, x, s, decoder="gaussian", method="rk45", rtol=1e-2, atol=1e-2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    L.vlb_terms(model, x, s)
    assert not model.training


def test_evaluation_is_deterministic_and_batch_independent_for_fixed_steps():
    s = cosine_schedule(20)
    torch.manual_seed(0)
    model = MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=1))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    a = L.ode_nll(model, x, s, method="rk4", steps=10).nll
    b = L.ode_nll(model, x, s, method="rk4", steps=10, batch_size=3).nll
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(L.vlb_terms(model, x, s).total, L.vlb_terms(model, x, s).total)


@pytest.mark.parametrize("make", [linear_schedule, cosine_schedule])
def test_index_at_log_snr_inverts_alpha_bar_at(make):
    s = make(50)
    for idx in [0.0, 0.3, 1.0, 17.5, 48.99, 49.0]:
        lam = float(torch.logit(s.alpha_bar_at(torch.tensor([idx], dtype=torch.float64))))
        assert L.index_at_log_snr(s, lam) == pytest.approx(idx, abs=1e-9)
    with pytest.raises(ValueError, match="outside"):
        L.index_at_log_snr(s, float(s.log_snr[0]) + 1.0)


def test_ode_decoder_nll_matches_its_closed_form():
    """With the exact denoiser, p_ODE(x_1) = q(x_1) (up to the prior's mismatch, ~1e-5 here), so the
    bound's expectation is H[q(x_1)] + E[-log p(x0 | x_1)] - H[q(x_1 | x0)], all Gaussian."""
    s = linear_schedule(1000)
    x0 = MU + VAR.sqrt() * torch.randn(400, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    nll = L.ode_decoder_nll(ideal(s), x0, s, decoder="gaussian", method="rk4", steps=30,
                            generator=torch.Generator().manual_seed(7))
    ab, s0 = s.alpha_bar[0], L.reverse_variance(s)[0]
    var_x0 = VAR * (1 - ab) / (ab * VAR + 1 - ab)
    expected = (0.5 * torch.log(2 * math.pi * math.e * (ab * VAR + 1 - ab))
                + 0.5 * torch.log(2 * math.pi * s0) + var_x0 / (2 * s0)
                - 0.5 * torch.log(2 * math.pi * math.e * (1 - ab))).sum()
    se = float(nll.std()) / math.sqrt(len(nll))
    assert abs(float(nll.mean()) - float(expected)) < 4 * se
    entropy = float(0.5 * torch.log(2 * math.pi * math.e * VAR).sum())
    assert float(expected) > entropy  # a bound: here 0.15 nats per dimension, the decoder's variance
