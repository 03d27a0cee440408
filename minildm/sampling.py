"""Samplers: from pure noise x_T ~ N(0, I) back to data, with a trained denoiser.

Every sampler is a plain function with one signature,

    sample_xxx(model, x, schedule, steps=..., *, prediction="eps", callback=None,
               progress=False, generator=None, ...) -> x0

where `model(xt, t) -> prediction` (see `minildm.diffusion.Denoiser`), `x` is the starting
noise (B, ...), and `callback` (if given) is called after every step with a dict
{"i": step number, "t": the index stepped from (fractional with EDM's spacing), "xt": the
new sample, "x0": the model's current guess of the data}. Conditioning and classifier-free
guidance wrap the model (a closure `lambda xt, t: model(xt, t, cond)`), so every sampler
supports them.

The number of network evaluations (NFE) each one spends is in its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from minildm.diffusion import Denoiser, Prediction, broadcast, predict_x0_eps, q_posterior
from minildm.schedules import Schedule

Callback = Callable[[dict], None]


def timesteps(schedule: Schedule, steps: int) -> Tensor:
    """`steps` indices evenly spaced from T-1 down to 0 (DDIM, section 4.2), int64, (steps,)."""
    if not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must be between 1 and T={schedule.T}, got {steps}")
    return torch.linspace(schedule.T - 1, 0, steps, dtype=torch.float64).round().long()


def edm_sigmas(schedule: Schedule, steps: int, rho: float = 7.0, sigma_max: float = 80.0) -> Tensor:
    """EDM's noise levels (Karras et al. 2022, eq. 5), float64, (steps,), decreasing:

        sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    evenly spaced in sigma^(1/rho): each step shrinks sigma by a similar factor, and compared
    with even steps in sigma, rho > 1 shortens the steps at low noise, where the image's
    detail forms (rho = 7 in EDM). sigma_min is the schedule's smallest noise level (t = 0);
    sigma_max is EDM's 80, or the schedule's largest if that is smaller. Beyond sigma = 80 an
    image in [-1, 1] is lost in the noise (its std is 80), so starting there skips nothing.
    """
    if steps < 2:
        raise ValueError(f"EDM's spacing needs at least 2 steps, got {steps}")
    lo = float(schedule.sigmas[0])
    hi = min(sigma_max, float(schedule.sigmas[-1]))
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) noise shaped like x, drawn on the generator's device (a seeded CPU generator
    then gives the same draws whether x is on the CPU or a GPU), moved to x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, device=device, dtype=x.dtype, generator=generator).to(x.device)


def _denoise(model: Denoiser, x: Tensor, t: Tensor, schedule: Schedule, prediction: Prediction,
             clip_x0: float | None) -> tuple[Tensor, Tensor]:
    """One network evaluation at (possibly fractional) index t: returns (x0_hat, eps_hat)."""
    t_batch = t.to(x.device, torch.float32).expand(x.shape[0])
    ab = broadcast(schedule.alpha_bar_at(t_batch), x)
    x0, eps = predict_x0_eps(model(x, t_batch.to(x.dtype)), x, ab, prediction)
    if clip_x0 is not None:  # keep the data guess in the data's range (DDPM's image sampler)
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - torch.sqrt(ab) * x0) / torch.sqrt(1 - ab)
    return x0, eps


@torch.no_grad()
def sample_ddpm(
    model: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    prediction: Prediction = "eps",
    variance: Literal["posterior", "beta"] = "posterior",
    clip_x0: float | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral sampling, Algorithm 2 of DDPM (Ho et al. 2020). NFE = T.

    Each step draws x_{t-1} ~ N(mu_tilde(x_t, x0_hat), sigma_t^2 I), with sigma_t^2 the
    posterior variance beta_tilde_t or beta_t (section 3.2: both gave similar results).
    """
    for i, t in enumerate(tqdm(range(schedule.T - 1, -1, -1), disable=not progress, desc="DDPM")):
        t_idx = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, _ = _denoise(model, x, torch.tensor(float(t)), schedule, prediction, clip_x0)
        mean, var = q_posterior(x0, x, t_idx, schedule)
        if variance == "beta":
            var = torch.full_like(var, float(schedule.betas[t]))
        if t > 0:
            noise = randn_like(x, generator)
            x = mean + torch.sqrt(var) * noise
        else:
            x = mean
        if callback is not None:
            callback({"i": i, "t": t, "xt": x, "x0": x0})
    return x


@torch.no_grad()
def sample_ddim(
    model: Denoiser,
    x: Tensor,
    schedule: Schedule,
    steps: int = 50,
    *,
    eta: float = 0.0,
    prediction: Prediction = "eps",
    clip_x0: float | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) over `steps` evenly spaced indices. NFE = steps.

    x_{t'} = sqrt(alpha_bar_t') x0_hat + sqrt(1 - alpha_bar_t' - s^2) eps_hat + s z, with
    s = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_t')
    (eq. 16). eta = 0 is deterministic (the probability-flow ODE's Euler method in the
    sigma variable); eta = 1 matches DDPM's ancestral variance.
    """
    ts = timesteps(schedule, steps).tolist()
    alpha_bar = schedule.alpha_bar
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="DDIM")):
        x0, eps = _denoise(model, x, torch.tensor(float(t)), schedule, prediction, clip_x0)
        ab = float(alpha_bar[t])
        ab_next = float(alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        s = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)) ** 0.5
        x = ab_next**0.5 * x0 + max(1 - ab_next - s**2, 0.0) ** 0.5 * eps
        if s > 0:
            x = x + s * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "xt": x, "x0": x0})
    return x


@torch.no_grad()
def sample_heun(
    model: Denoiser,
    x: Tensor,
    schedule: Schedule,
    steps: int = 25,
    *,
    rho: float | None = None,
    prediction: Prediction = "eps",
    clip_x0: float | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,  # unused: the ODE is deterministic; kept for the shared signature
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).
    NFE = 2 steps - 1.

    In the variable y = x_t / sqrt(alpha_bar_t) with noise level sigma = sqrt((1 - alpha_bar) / alpha_bar),
    the probability-flow ODE (Song et al. 2021, eq. 13) reads dy/dsigma = eps_hat(y, sigma)
    (EDM, eq. 4 with s(t) = 1). We integrate it over `steps` noise levels, then take a last
    Euler step to sigma = 0. Where the steps go:

    - rho=None: at `steps` evenly spaced indices from T-1 to 0 (DDIM's spacing);
    - rho=7 (or another number): at EDM's levels `edm_sigmas(schedule, steps, rho)`, from
      min(80, sigma_{T-1}) down to sigma_0, asking the network at the fractional index
      `schedule.t_of_sigma(sigma)`.
    """
    if rho is None:
        ts = timesteps(schedule, steps).to(torch.float64)
        sigmas = schedule.sigmas[ts.long()].to(torch.float64)  # (steps,)
    else:
        sigmas = edm_sigmas(schedule, steps, rho)  # (steps,)
        ts = schedule.t_of_sigma(sigmas)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # (steps + 1,)
    ts = torch.cat([ts, ts.new_zeros(1)])
    y = x * float(1 + sigmas[0] ** 2) ** 0.5  # y = x_T / sqrt(alpha_bar_T)

    def eps_at(y: Tensor, j: int) -> tuple[Tensor, Tensor]:
        xt = y / float(1 + sigmas[j] ** 2) ** 0.5
        x0, eps = _denoise(model, xt, ts[j], schedule, prediction, clip_x0)
        return x0, eps

    for i in tqdm(range(steps), disable=not progress, desc="Heun"):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, d = eps_at(y, i)
        y_next = y + (s_next - s) * d  # Euler step
        if s_next > 0:  # Heun correction: average the slopes at both ends
            _, d_next = eps_at(y_next, i + 1)
            y_next = y + (s_next - s) * 0.5 * (d + d_next)
        y = y_next
        if callback is not None:
            callback({"i": i, "t": float(ts[i]), "xt": y / (1 + s_next**2) ** 0.5, "x0": x0})
    return y


def count_nfe(model: Denoiser) -> tuple[Denoiser, list[int]]:
    """Wrap a model so that its calls are counted: returns (wrapped, counter) with counter[0] = NFE."""
    counter = [0]

    def wrapped(xt: Tensor, t: Tensor) -> Tensor:
        counter[0] += 1
        return model(xt, t)

    return wrapped, counter
