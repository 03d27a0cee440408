"""The forward process and the targets, against closed forms and Monte Carlo."""

import pytest
import torch

from minildm import diffusion as D
from minildm.schedules import cosine_schedule, linear_schedule


def test_q_sample_matches_many_single_steps():
    """Applying q(x_t | x_{t-1}) t+1 times gives the closed form q(x_t | x_0) (DDPM eq. 4)."""
    torch.manual_seed(0)
    s = linear_schedule(100)
    x0 = torch.tensor([1.5, -0.5]).repeat(40_000, 1)
    t_final = 60
    x = x0.clone()
    for t in range(t_final + 1):
        x = D.q_step(x, torch.full((len(x),), t), torch.randn_like(x), s)
    ab = float(s.alpha_bar[t_final])
    torch.testing.assert_close(x.mean(0), ab**0.5 * x0[0], atol=0.02, rtol=0)
    torch.testing.assert_close(x.var(0), torch.full((2,), 1 - ab), atol=0.02, rtol=0)
    closed = D.q_sample(x0, torch.full((len(x),), t_final), torch.randn_like(x0), s)
    torch.testing.assert_close(closed.mean(0), x.mean(0), atol=0.03, rtol=0)


def test_q_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the product of two Gaussians, computed independently."""
    s = cosine_schedule(50)
    torch.manual_seed(1)
    x0, xt = torch.randn(7, 3), torch.randn(7, 3)
    t = torch.randint(1, 50, (7,))
    mean, var = D.q_posterior(x0, xt, t, s)
    ab_prev = s.alpha_bar_prev[t].float()[:, None]
    alpha, beta = s.alphas[t].float()[:, None], s.betas[t].float()[:, None]
    # prior x_{t-1} | x0 ~ N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta)
    precision = 1 / (1 - ab_prev) + alpha / beta
    expected_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + alpha.sqrt() * xt / beta) / precision
    torch.testing.assert_close(mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, 1 / precision, rtol=1e-4, atol=1e-7)


def test_posterior_variance_zero_at_first_step():
    s = linear_schedule(50)
    _, var = D.q_posterior(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), s)
    assert torch.all(var == 0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_targets_round_trip(prediction):
    torch.manual_seed(2)
    x0, eps = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ab = torch.rand(5, 1, dtype=torch.float64) * 0.98 + 0.01
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = D.target(x0, eps, ab, prediction)
    x0_hat, eps_hat = D.predict_x0_eps(pred, xt, ab, prediction)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_v_is_the_rotation_of_x0_and_eps():
    """With alpha = sqrt(ab), sigma = sqrt(1 - ab): (xt, v) is (x0, eps) rotated by phi, alpha = cos phi."""
    ab = torch.tensor([[0.3]], dtype=torch.float64)
    x0, eps = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.0]], dtype=torch.float64)
    v = D.v_from_x0_eps(x0, eps, ab)
    torch.testing.assert_close(v, -(1 - ab).sqrt())  # d/dphi (cos phi x0 + sin phi eps) at eps = 0


def test_unknown_prediction_rejected():
    with pytest.raises(ValueError, match="'eps', 'x0' or 'v'"):
        D.target(torch.zeros(1), torch.zeros(1), torch.ones(1), "score")


def test_training_loss_of_exact_denoiser_is_the_mmse():
    """For x0 ~ N(0, s2), E||eps - E[eps|xt]||^2 per dimension = ab s2 / (ab s2 + 1 - ab), averaged over t."""
    s = cosine_schedule(100)
    s2 = 0.25
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(100_000, 2, generator=g, dtype=torch.float64) * s2**0.5

    def ideal(xt, t):
        return D.gaussian_eps(xt, D.extract(s.alpha_bar, t, xt), 0.0, s2)

    loss = D.training_loss(ideal, x0, s, generator=g)
    ab = s.alpha_bar
    expected = (ab * s2 / (ab * s2 + 1 - ab)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=0.02)
    zero_loss = D.training_loss(lambda xt, t: torch.zeros_like(xt), x0, s, generator=g)
    assert float(zero_loss) == pytest.approx(1.0, rel=0.02)  # E||eps||^2 per dimension


def test_extract_shapes_and_dtype():
    a = torch.arange(10, dtype=torch.float64)
    out = D.extract(a, torch.tensor([1, 9]), torch.zeros(2, 3, 4, 5, dtype=torch.float32))
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [1.0, 9.0]
