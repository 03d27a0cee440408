"""Loss weightings over t: which noise levels a diffusion objective cares about.

Every objective in this module is a weighted regression, E_{t, eps}[w_t ||target - pred||^2],
and differs from the others only by w_t. It is easiest to compare them in one space, the
error on x0: since x0 - x0_hat = -(eps - eps_hat) / sqrt(snr_t) = sqrt(1 - alpha_bar_t) (v - v_hat)
(see `minildm.diffusion`),

    ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / snr_t = ||v - v_hat||^2 / (1 + snr_t),

so a weight lambda_t on the x0 error is a weight lambda_t / snr_t on the eps error and
lambda_t / (1 + snr_t) on the v error (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting Strategy", section 3.4). The weightings (`Weighting`):

    "simple"   w_t = 1 on the network's own target: DDPM's L_simple (Ho et al. 2020, eq. 14).
    "vlb"      the true variational bound (DDPM eq. 5 and 12): lambda_t = (snr_{t-1} - snr_t) / 2
               for t >= 1 (VDM, Kingma et al. 2021, eq. 13), so that w_t ||target - pred||^2 summed
               over dimensions *is* the KL term L_{t-1} in nats; at t = 0, lambda_0 = 1 / (2 sigma_0^2),
               the quadratic part of the Gaussian decoder -log N(x0; x0_hat, sigma_0^2), with
               sigma_0^2 = beta_tilde at index 1 (DDPM's code; `minildm.likelihood.reverse_variance`).
    "snr"      lambda_t = snr_t: for eps prediction this is L_simple again (w_t = 1).
    "min_snr"  lambda_t = min(snr_t, gamma) (Hang et al. 2023, eq. 9), gamma = 5 by default.

Indices t are 0-based, as in `minildm.schedules`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from minildm.schedules import Schedule

Weighting = Literal["simple", "vlb", "snr", "min_snr"]
WEIGHTINGS: tuple[str, ...] = ("simple", "vlb", "snr", "min_snr")


def x0_weight(schedule: Schedule, t: Tensor, weighting: Weighting, gamma: float = 5.0) -> Tensor:
    """lambda_t: the weight each weighting puts on ||x0 - x0_hat||^2 at indices t, float64, t's shape.

    "simple" has no x0-space weight of its own (it depends on the prediction); use `loss_weight`.
    """
    t = t.long().cpu()
    snr = schedule.snr[t]
    if weighting == "snr":
        return snr
    if weighting == "min_snr":
        return snr.clamp(max=gamma)
    if weighting == "vlb":
        snr_prev = schedule.snr[(t - 1).clamp(min=0)]
        i = min(1, schedule.T - 1)  # the decoder's variance is beta_tilde at index 1 (beta_tilde_0 = 0)
        var_decoder = (1 - schedule.alpha_bar_prev[i]) / (1 - schedule.alpha_bar[i]) * schedule.betas[i]
        return torch.where(t > 0, 0.5 * (snr_prev - snr), 0.5 / var_decoder)
    raise ValueError(f"weighting must be one of {WEIGHTINGS[1:]} here, got {weighting!r}")


def loss_weight(schedule: Schedule, t: Tensor, weighting: Weighting, prediction: str = "eps",
                gamma: float = 5.0) -> Tensor:
    """w_t: the weight on ||target - pred||^2 for a network predicting `prediction`, float64, t's shape.

    w_t = lambda_t (x0), lambda_t / snr_t (eps), lambda_t / (1 + snr_t) (v); "simple" is 1 for all three.
    """
    if weighting == "simple":
        return torch.ones(t.shape, dtype=torch.float64)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    lam = x0_weight(schedule, t, weighting, gamma)
    snr = schedule.snr[t.long().cpu()]
    if prediction == "x0":
        return lam
    if prediction == "eps":
        return lam / snr
    if prediction == "v":
        return lam / (1 + snr)
    raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
