"""Noise schedules: how much signal is left at each step of the forward process.

A schedule is fully described by alpha_bar(t), the fraction of the data's variance
kept at time t, since q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
(DDPM, Ho et al. 2020, eq. 4). Everything else follows from it:

    beta_t  = 1 - alpha_bar_t / alpha_bar_{t-1}     the per-step noise variance (eq. 2)
    snr(t)  = alpha_bar_t / (1 - alpha_bar_t)        signal-to-noise ratio (VDM, eq. 1-2)
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)  noise level of x_t / sqrt(alpha_bar_t) (EDM)

Continuous time uses t in [0, 1]; discrete time uses an index t in {0, ..., T-1}, where
alpha_bar[t] is the signal kept after t + 1 noising steps (the convention of improved
DDPM and diffusers: x_0 is the data, and index t produces x_{t+1} in the paper's 1-based
notation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------
# Continuous-time alpha_bar(t), t in [0, 1]


def alpha_bar_linear(t: Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> Tensor:
    """alpha_bar(t) of DDPM's linear schedule in continuous time (Song et al. 2021, VP SDE).

    beta(t) = beta_min + t (beta_max - beta_min), alpha_bar(t) = exp(-int_0^t beta(s) ds).
    With T = 1000 steps this matches betas linear from 1e-4 to 0.02.
    """
    return torch.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t**2))


def alpha_bar_cosine(t: Tensor, s: float = 0.008) -> Tensor:
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t + s) / (1 + s)) pi / 2) (improved DDPM, eq. 17)."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def alpha_bar_sigmoid(t: Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> Tensor:
    """Sigmoid schedule (Chen 2023, "On the importance of noise scheduling", Algorithm 1).

    alpha_bar(t) = (sigmoid(end / tau) - sigmoid((t (end - start) + start) / tau))
                   / (sigmoid(end / tau) - sigmoid(start / tau)).
    """
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=t.dtype))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=t.dtype))
    v = torch.sigmoid((t * (end - start) + start) / tau)
    return (v_end - v) / (v_end - v_start)


def snr(alpha_bar: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (VDM, Kingma et al. 2021, eq. 1-2)."""
    return alpha_bar / (1 - alpha_bar)


def log_snr(alpha_bar: Tensor) -> Tensor:
    """log SNR = log(alpha_bar) - log(1 - alpha_bar), computed without overflow at the ends."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


# ----------------------------------------------------------------------------------------
# Discrete-time schedules, index t in {0, ..., T-1}


@dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule of T steps, held as its betas (T,) in float64.

    Derived quantities are computed on access; call `.to(...)`-free helpers below, which
    cast to the dtype and device of the tensor they are applied to.
    """

    betas: Tensor  # (T,) float64, each in (0, 1)

    def __post_init__(self) -> None:
        if self.betas.ndim != 1 or len(self.betas) < 1:
            raise ValueError(f"betas must be a 1-D tensor with at least one step, got shape {tuple(self.betas.shape)}")
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("every beta must lie strictly between 0 and 1")

    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return len(self.betas)

    @property
    def alphas(self) -> Tensor:
        """alpha_t = 1 - beta_t, (T,)."""
        return 1.0 - self.betas

    @property
    def alpha_bar(self) -> Tensor:
        """alpha_bar_t = prod_{s <= t} alpha_s (DDPM, above eq. 4), (T,)."""
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alpha_bar_prev(self) -> Tensor:
        """alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (the data itself), (T,)."""
        return torch.cat([self.betas.new_ones(1), self.alpha_bar[:-1]])

    @property
    def snr(self) -> Tensor:
        """SNR at each step, (T,)."""
        return snr(self.alpha_bar)

    @property
    def log_snr(self) -> Tensor:
        """log SNR at each step, (T,)."""
        return log_snr(self.alpha_bar)

    @property
    def sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the EDM noise level, (T,)."""
        return torch.sqrt((1 - self.alpha_bar) / self.alpha_bar)

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """alpha_bar at a possibly fractional index t in [0, T-1], same shape as t.

        Between integer steps the log-SNR is interpolated linearly, so samplers that step
        between the training timesteps (Heun, the probability-flow ODE) see a smooth schedule.
        At integer t this equals alpha_bar[t] exactly.
        """
        lam = self.log_snr.to(t.device)
        t = t.to(torch.float64).clamp(0, self.T - 1)
        lo = t.floor().long().clamp(max=self.T - 2) if self.T > 1 else t.long()
        frac = t - lo
        hi = (lo + 1).clamp(max=self.T - 1)
        lam_t = torch.lerp(lam[lo], lam[hi], frac)
        return torch.sigmoid(lam_t)  # alpha_bar = sigmoid(log SNR)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """The fractional index t whose noise level is sigma: the inverse of `alpha_bar_at`
        through sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) = exp(-log SNR_t / 2), float64,
        same shape as sigma. sigma must lie within [sigmas[0], sigmas[T-1]].

        Samplers with their own noise levels (EDM's sigma spacing) use it to ask the network
        at the matching t; log-SNR is linear between integer steps, so this is exact.
        """
        lam = self.log_snr.to(sigma.device)  # (T,), decreasing in t
        target = -2 * torch.log(sigma.to(torch.float64))  # log SNR = -2 log sigma
        lo_s, hi_s = float(self.sigmas[0]), float(self.sigmas[-1])
        if (sigma < lo_s * (1 - 1e-9)).any() or (sigma > hi_s * (1 + 1e-9)).any():
            raise ValueError(f"sigma must lie within the schedule's noise levels [{lo_s:.4g}, {hi_s:.4g}]")
        if self.T == 1:
            return torch.zeros_like(target)
        # lo: the last index whose log SNR is >= target (searchsorted on the increasing -lam)
        lo = (torch.searchsorted(-lam, -target.contiguous(), right=True) - 1).clamp(0, self.T - 2)
        frac = (lam[lo] - target) / (lam[lo] - lam[lo + 1])
        return lo.to(torch.float64) + frac.clamp(0, 1)


def betas_from_alpha_bar(alpha_bar_fn: Callable[[Tensor], Tensor], T: int, max_beta: float = 0.999) -> Tensor:
    """Discretise a continuous alpha_bar(t) into T betas (improved DDPM, section 3.2).

    beta_t = min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta). The clipping
    keeps the last steps from being singular near t = 1, where alpha_bar reaches 0.
    """
    t = torch.arange(T + 1, dtype=torch.float64) / T
    a = alpha_bar_fn(t)
    return torch.clamp(1 - a[1:] / a[:-1], min=1e-12, max=max_beta)


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear betas (Ho et al. 2020, section 4), rescaled by 1000 / T as in improved DDPM
    so that a shorter chain covers the same noise levels."""
    scale = 1000 / T
    if scale * beta_end >= 1:
        raise ValueError(f"linear_schedule rescales betas by 1000 / T, and T={T} makes the last beta "
                         f"{scale * beta_end:.3g} >= 1; use more steps or cosine_schedule(T)")
    return Schedule(torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64))


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at max_beta."""
    return Schedule(betas_from_alpha_bar(lambda t: alpha_bar_cosine(t, s), T, max_beta))


def sigmoid_schedule(T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                     max_beta: float = 0.999) -> Schedule:
    """Chen (2023)'s sigmoid schedule, discretised like the cosine one."""
    return Schedule(betas_from_alpha_bar(lambda t: alpha_bar_sigmoid(t, start, end, tau), T, max_beta))
