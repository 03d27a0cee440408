"""The Gaussian diffusion process: the forward distributions and the network's targets.

Notation follows DDPM (Ho et al. 2020) with a 0-based step index t in {0, ..., T-1}
(see `minildm.schedules`): x0 is the data, xt the noised sample, eps ~ N(0, I) the noise.

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)                    eq. 2
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)             eq. 4
    q(x_{t-1} | x_t, x_0) = N(mu_tilde(x_t, x_0), beta_tilde_t I)                eq. 6-7

A denoiser predicts one of three equivalent targets (`Prediction`): the noise eps (DDPM),
the clean data x0, or the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
(Salimans & Ho 2022, section 4). Given x_t, any one of them determines the other two.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from minildm.schedules import Schedule
from minildm.weighting import Weighting, loss_weight

Prediction = Literal["eps", "x0", "v"]


class Denoiser(Protocol):
    """What the samplers and losses call: ``model(xt, t) -> prediction`` with t of shape (B,)."""

    def __call__(self, xt: Tensor, t: Tensor) -> Tensor: ...


def extract(a: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """Gather a[t] for a batch of indices t (B,) and shape it (B, 1, ..., 1) to broadcast
    against `like`, in like's dtype and device."""
    out = a.to(like.device)[t.to(like.device).long()]
    return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def broadcast(a: Tensor, like: Tensor) -> Tensor:
    """Shape a per-sample value (B,) as (B, 1, ..., 1) in like's dtype and device."""
    return a.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------
# The forward process


def q_step(x_prev: Tensor, t: Tensor, eps: Tensor, schedule: Schedule) -> Tensor:
    """Sample q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (DDPM eq. 2): one step."""
    beta = extract(schedule.betas, t, x_prev)
    return torch.sqrt(1 - beta) * x_prev + torch.sqrt(beta) * eps


def q_sample(x0: Tensor, t: Tensor, eps: Tensor, schedule: Schedule) -> Tensor:
    """Sample q(x_t | x_0) in closed form (DDPM eq. 4):
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    ab = extract(schedule.alpha_bar, t, x0)
    return torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * eps


def q_posterior(x0: Tensor, xt: Tensor, t: Tensor, schedule: Schedule) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7).

    mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t      (0 at t = 0)
    Returns (mean like x0, variance (B, 1, ..., 1)).
    """
    beta = extract(schedule.betas, t, x0)
    ab = extract(schedule.alpha_bar, t, x0)
    ab_prev = extract(schedule.alpha_bar_prev, t, x0)
    mean = torch.sqrt(ab_prev) * beta / (1 - ab) * x0 + torch.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * xt
    var = (1 - ab_prev) / (1 - ab) * beta
    return mean, var


# ----------------------------------------------------------------------------------------
# Conversions between the three targets, given alpha_bar broadcastable against x_t


def x0_from_eps(xt: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (DDPM eq. 4 solved for x0; eq. 15)."""
    return (xt - torch.sqrt(1 - alpha_bar) * eps) / torch.sqrt(alpha_bar)


def eps_from_x0(xt: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar) (DDPM eq. 4 solved for eps)."""
    return (xt - torch.sqrt(alpha_bar) * x0) / torch.sqrt(1 - alpha_bar)


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, section 4)."""
    return torch.sqrt(alpha_bar) * eps - torch.sqrt(1 - alpha_bar) * x0


def x0_from_v(xt: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v (Salimans & Ho 2022, appendix D)."""
    return torch.sqrt(alpha_bar) * xt - torch.sqrt(1 - alpha_bar) * v


def eps_from_v(xt: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v (Salimans & Ho 2022, appendix D)."""
    return torch.sqrt(1 - alpha_bar) * xt + torch.sqrt(alpha_bar) * v


def predict_x0_eps(pred: Tensor, xt: Tensor, alpha_bar: Tensor, prediction: Prediction) -> tuple[Tensor, Tensor]:
    """Turn a network output of any parametrisation into the pair (x0_hat, eps_hat)."""
    if prediction == "eps":
        return x0_from_eps(xt, pred, alpha_bar), pred
    if prediction == "x0":
        return pred, eps_from_x0(xt, pred, alpha_bar)
    if prediction == "v":
        return x0_from_v(xt, pred, alpha_bar), eps_from_v(xt, pred, alpha_bar)
    raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")


def target(x0: Tensor, eps: Tensor, alpha_bar: Tensor, prediction: Prediction) -> Tensor:
    """The regression target for a network that predicts `prediction`."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(x0, eps, alpha_bar)
    raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")


def gaussian_eps(xt: Tensor, alpha_bar: Tensor, mu: Tensor | float, var: Tensor | float) -> Tensor:
    """The exact denoiser E[eps | x_t] when the data is Gaussian, x0 ~ N(mu, var I).

    x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps is then Gaussian too, and
    E[eps | x_t] = sqrt(1 - alpha_bar) (x_t - sqrt(alpha_bar) mu) / (alpha_bar var + 1 - alpha_bar).
    No network can beat it: the tests and lessons use it as the ideal model.
    """
    return torch.sqrt(1 - alpha_bar) * (xt - torch.sqrt(alpha_bar) * mu) / (alpha_bar * var + 1 - alpha_bar)


# ----------------------------------------------------------------------------------------
# Training


def training_loss(
    model: Denoiser,
    x0: Tensor,
    schedule: Schedule,
    prediction: Prediction = "eps",
    generator: torch.Generator | None = None,
    weighting: Weighting = "simple",
    gamma: float = 5.0,
    importance: bool = False,
) -> Tensor:
    """A weighted denoising loss E_{t, eps} w_t ||target - model(x_t, t)||^2 (DDPM, Algorithm 1).

    t is uniform over {0, ..., T-1} and eps ~ N(0, I); the mean is over batch and dimensions.
    weighting="simple" (w_t = 1) is L_simple (eq. 14); "vlb" makes T * dim * loss an unbiased
    estimate of the bound's diffusion terms (eq. 5, up to the decoder's constant); "snr" and
    "min_snr" (with `gamma`) are described in `minildm.weighting`.

    importance=True draws t with probability p_t proportional to w_t and weights by w_t / (T p_t),
    the same objective in expectation with less variance: the weighted loss becomes plain
    regression at t drawn from the weights (improved DDPM, section 3.3, importance-samples the
    bound with p_t learned from the loss history instead).
    """
    B = x0.shape[0]
    if importance:
        w_all = loss_weight(schedule, torch.arange(schedule.T), weighting, prediction, gamma)  # (T,)
        p = (w_all / w_all.sum()).to(x0.device)
        t = torch.multinomial(p, B, replacement=True, generator=generator)
    else:
        t = torch.randint(0, schedule.T, (B,), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = q_sample(x0, t, eps, schedule)
    pred = model(xt, t.to(x0.dtype))
    p_t = p.cpu()[t.cpu()] if importance else None
    return denoising_loss(pred, x0, eps, t, schedule, prediction, weighting, gamma, p_t)


def denoising_loss(pred: Tensor, x0: Tensor, eps: Tensor, t: Tensor, schedule: Schedule,
                   prediction: Prediction = "eps", weighting: Weighting = "simple", gamma: float = 5.0,
                   p_t: Tensor | None = None) -> Tensor:
    """mean_b w_t ||target_b - pred_b||^2 / dim for a prediction made at x_t = q_sample(x0, t, eps):
    the regression at the heart of `training_loss`, for loops that draw t and eps themselves
    (the command line's runner draws them for the global batch of all GPUs).

    pred, x0, eps (B, ...); t (B,) indices; w_t from `weighting` (`minildm.weighting`), times
    1 / (T p_t) if `p_t` (B,), the probabilities t was drawn with, is given (importance
    sampling: the same objective in expectation). Computed in float32.
    """
    err = (pred.float() - target(x0, eps, extract(schedule.alpha_bar, t, x0), prediction).float()).pow(2)
    if weighting == "simple" and p_t is None:
        return err.mean()
    w = loss_weight(schedule, t.cpu(), weighting, prediction, gamma)  # (B,)
    if p_t is not None:
        w = w / (schedule.T * p_t)
    return (w.to(err.device, err.dtype) * err.reshape(x0.shape[0], -1).mean(1)).mean()
