"""Samplers with the exact denoiser for Gaussian data must recover that Gaussian."""

import pytest
import torch

from minildm import sampling
from minildm.diffusion import broadcast, gaussian_eps, v_from_x0_eps, x0_from_eps
from minildm.schedules import cosine_schedule, linear_schedule

MU, VAR = torch.tensor([1.0, -2.0]), torch.tensor([0.25, 0.04])


def ideal(schedule, prediction="eps"):
    """E[eps | x_t] (or the matching x0 / v) for x0 ~ N(MU, diag VAR)."""

    def model(xt, t):
        ab = broadcast(schedule.alpha_bar_at(t), xt)
        eps = gaussian_eps(xt, ab, MU, VAR)
        if prediction == "eps":
            return eps
        x0 = x0_from_eps(xt, eps, ab)
        return x0 if prediction == "x0" else v_from_x0_eps(x0, eps, ab)

    return model


# DDIM is a first-order method: it needs the full chain of a fine schedule to be within a
# few percent (at 50 of 200 steps its variance is ~10% low); Heun gets there in 25 steps.
SAMPLERS = [
    ("ddpm", lambda m, x, s, g: sampling.sample_ddpm(m, x, s, generator=g)),
    ("ddim eta=0", lambda m, x, s, g: sampling.sample_ddim(m, x, s, 1000, generator=g)),
    ("ddim eta=1", lambda m, x, s, g: sampling.sample_ddim(m, x, s, 1000, eta=1.0, generator=g)),
    ("heun", lambda m, x, s, g: sampling.sample_heun(m, x, s, 25)),
    ("heun edm", lambda m, x, s, g: sampling.sample_heun(m, x, s, 25, rho=7.0)),
]


@pytest.mark.parametrize("name,sample", SAMPLERS, ids=[n for n, _ in SAMPLERS])
def test_sampler_recovers_gaussian(name, sample):
    s = linear_schedule(1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 2, generator=g)
    out = sample(ideal(s), x, s, g)
    torch.testing.assert_close(out.mean(0), MU, atol=0.02, rtol=0)
    torch.testing.assert_close(out.var(0), VAR, atol=0.01, rtol=0.05)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_heun_with_other_parametrisations(prediction):
    s = cosine_schedule(100)
    x = torch.randn(10_000, 2, generator=torch.Generator().manual_seed(1))
    out = sampling.sample_heun(ideal(s, prediction), x, s, 50, prediction=prediction)
    torch.testing.assert_close(out.mean(0), MU, atol=0.02, rtol=0)
    torch.testing.assert_close(out.var(0), VAR, atol=0.01, rtol=0.05)


def test_heun_is_second_order_and_ddim_first_order():
    """Halving the step size cuts Heun's error about 4x and DDIM's about 2x."""
    s = linear_schedule(1000)
    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(4))

    def err(sample, steps):
        return float((sample(ideal(s), x, s, steps).var(0)[0] - VAR[0]).abs())

    ddim = err(sampling.sample_ddim, 20) / err(sampling.sample_ddim, 40)
    heun = err(sampling.sample_heun, 20) / err(sampling.sample_heun, 40)
    assert 1.5 < ddim < 2.7 and heun > 3.0, (ddim, heun)


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    s = cosine_schedule(50)
    x = torch.randn(8, 2)
    a = sampling.sample_ddim(ideal(s), x, s, 10, generator=torch.Generator().manual_seed(1))
    b = sampling.sample_ddim(ideal(s), x, s, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = sampling.sample_ddpm(ideal(s), x, s, generator=torch.Generator().manual_seed(1))
    d = sampling.sample_ddpm(ideal(s), x, s, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)


def test_ddim_and_heun_agree_on_the_ode_with_many_steps():
    """Both integrate the same probability-flow ODE: with fine steps they meet pointwise."""
    s = cosine_schedule(200)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    a = sampling.sample_ddim(ideal(s), x, s, 200)
    b = sampling.sample_heun(ideal(s), x, s, 100)
    torch.testing.assert_close(a, b, atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "call,expected",
    [
        (lambda m, x, s: sampling.sample_ddpm(m, x, s), 40),
        (lambda m, x, s: sampling.sample_ddim(m, x, s, 7), 7),
        (lambda m, x, s: sampling.sample_heun(m, x, s, 7), 13),
    ],
)
def test_nfe(call, expected):
    s = cosine_schedule(40)
    model, counter = sampling.count_nfe(ideal(s))
    call(model, torch.randn(4, 2), s)
    assert counter[0] == expected


def test_callback_sees_every_step():
    s = cosine_schedule(30)
    seen = []
    sampling.sample_ddim(ideal(s), torch.randn(4, 2), s, 6, callback=lambda d: seen.append((d["i"], d["xt"].shape)))
    assert [i for i, _ in seen] == list(range(6))


def test_timesteps_span_the_chain():
    s = cosine_schedule(100)
    ts = sampling.timesteps(s, 5)
    assert ts.tolist() == [99, 74, 50, 25, 0]
    with pytest.raises(ValueError, match="between 1 and T=100"):
        sampling.timesteps(s, 0)


def test_noise_comes_from_the_generator_on_its_own_device():
    """randn_like draws on the generator's device, so a seeded CPU generator gives the same
    noise for data on any device (here: the draws equal torch.randn from the same seed)."""
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    noise = sampling.randn_like(x, torch.Generator().manual_seed(7))
    expected = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert noise.device == x.device and noise.dtype == x.dtype
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)


def test_edm_sigmas_are_evenly_spaced_in_sigma_to_the_one_over_rho():
    """EDM eq. 5: the ends are sigma_max (80, or the schedule's largest) and sigma_min (the
    schedule's smallest), and sigma^(1/rho) falls by the same amount at every step."""
    s = cosine_schedule(100)
    sig = sampling.edm_sigmas(s, 10, rho=7.0)
    assert sig.shape == (10,) and (sig[1:] < sig[:-1]).all()
    torch.testing.assert_close(sig[[0, -1]], torch.tensor([80.0, float(s.sigmas[0])], dtype=torch.float64))
    gaps = (sig ** (1 / 7)).diff()
    torch.testing.assert_close(gaps, gaps[:1].expand(9))
    small = linear_schedule(1000, beta_end=0.01)  # largest sigma 12.6, below 80: the levels start there
    assert float(sampling.edm_sigmas(small, 5)[0]) == pytest.approx(float(small.sigmas[-1]))
    with pytest.raises(ValueError, match="at least 2 steps"):
        sampling.edm_sigmas(s, 1)


def test_t_of_sigma_inverts_alpha_bar_at():
    for s in (cosine_schedule(100), linear_schedule(1000)):
        t = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * (s.T - 1)
        ab = s.alpha_bar_at(t)
        torch.testing.assert_close(s.t_of_sigma(((1 - ab) / ab).sqrt()), t)
        torch.testing.assert_close(s.t_of_sigma(s.sigmas), torch.arange(s.T, dtype=torch.float64))
    with pytest.raises(ValueError, match="within the schedule's noise levels"):
        cosine_schedule(100).t_of_sigma(torch.tensor([1e6]))


def test_edm_spacing_beats_index_spacing_with_few_heun_steps_on_the_cosine_schedule():
    """On the cosine schedule the last index alone spans sigma ~ 64 to ~ 2000: evenly spaced
    indices waste Heun's few steps up there. EDM's spacing gets the Gaussian's variance far
    closer at the same NFE (9 and 15 here); with many steps both converge (test above)."""
    s = cosine_schedule(100)
    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(2))

    def var_error(steps, **spacing):
        out = sampling.sample_heun(ideal(s), x, s, steps, **spacing)
        return float(((out.var(0) - VAR) / VAR).abs().max())

    for steps in (5, 8):
        index, edm = var_error(steps), var_error(steps, rho=7.0)
        assert edm < index / 3, (steps, edm, index)
