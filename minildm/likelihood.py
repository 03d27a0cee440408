"""How likely is the data under a diffusion model? The variational bound, term by term, and
the exact log-likelihood through the probability-flow ODE; in nats and bits per dimension.

1. The variational bound (DDPM, Ho et al. 2020, eq. 5), 0-based indices as in `minildm.schedules`:

    -log p(x0) <= L_T + sum_{t=1}^{T-1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x0) || N(0, I))                                  the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))                  one per step t >= 1
    L_0     = -log p(x0 | x_1)                                             the decoder

   where p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), sigma_t^2 I) uses the network's x0_hat and a
   fixed variance (`reverse_variance`). For 8-bit images the decoder is DDPM's discretized
   Gaussian (section 3.3, eq. 13): the bound is then on the NLL of a probability, in bits per
   dimension directly comparable with the papers. For continuous data (the 2-D toys) it is a Gaussian density.

2. The probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
   eq. 13 and appendix D.2) maps data to noise deterministically, and the instantaneous change
   of variables (Chen et al. 2018; FFJORD, Grathwohl et al. 2019) gives the exact density of the
   model it defines: log p(x(start)) = log N(x(end); 0, I) + int_start^end div F(x, lam) dlam.
   The schedule's continuous-time view is `Schedule.alpha_bar_at` (log-SNR linear between the
   integer steps, as the samplers use); we take its log-SNR lam itself as the ODE's time, so
   the drift F = dx/dlam is smooth (in the index s it would jump at every integer step), and
   call the network at the fractional index s(lam). The flow runs from s = 0 (one noising step,
   sigma ~ 0.01 for DDPM's linear schedule; the role of Song et al.'s t = eps) to s = T - 1.
   The divergence is exact (one backward pass per dimension) or Hutchinson's estimate (one
   backward pass per probe, probes fixed along the path). `ode_decoder_nll` joins the two: the
   ODE's density for x_1 and the bound's decoder for x0, which suits 8-bit images.

3. Units. An NLL in nats over D dimensions is NLL / (D ln 2) bits per dimension. A continuous
   density of 8-bit data is made comparable with a discrete one by uniform dequantization
   (Theis et al. 2016): -log P(x) <= E_u[-log p(x + u)] + D log(levels / data_range), i.e.
   + 7 bits/dim for data in [-1, 1] (+ 8 for [0, 1]; the offset in Song et al.'s code).

Evaluation never changes the model: an nn.Module is put in eval mode and its mode restored,
no gradient reaches the parameters, and all randomness comes from the `generator` passed in
(a fresh one seeded 0 when none is), so the global RNG is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minildm.diffusion import Denoiser, Prediction, broadcast, predict_x0_eps, q_posterior, q_sample
from minildm.ode import OdeMethod, odeint
from minildm.schedules import Schedule

# ----------------------------------------------------------------------------------------
# Building blocks: Gaussian KL and log-likelihoods, elementwise, in nats


def normal_kl(mean1: Tensor, var1: Tensor | float, mean2: Tensor, var2: Tensor | float) -> Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, in nats:
    (log(var2 / var1) + (var1 + (mean1 - mean2)^2) / var2 - 1) / 2."""
    var1, var2 = torch.as_tensor(var1, dtype=mean1.dtype), torch.as_tensor(var2, dtype=mean1.dtype)
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor | float) -> Tensor:
    """log N(x; mean, var) elementwise, in nats."""
    var = torch.as_tensor(var, dtype=x.dtype)
    return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var)


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor | float, levels: int = 256) -> Tensor:
    """log P(x) elementwise for x on the grid of `levels` values in [-1, 1], where P is N(mean, var)
    integrated over x's bin (DDPM eq. 13): [x - 1/(levels-1), x + 1/(levels-1)], with the first
    bin extended to -inf and the last to +inf, so the probabilities of all levels sum to 1.

    The difference of two normal CDFs is computed in log space on the side of the nearer tail,
    so that it stays accurate far from the mean.
    """
    half = 1.0 / (levels - 1)
    std = torch.sqrt(torch.as_tensor(var, dtype=x.dtype))
    upper, lower = (x - mean + half) / std, (x - mean - half) / std
    log_cdf_upper, log_cdf_lower = torch.special.log_ndtr(upper), torch.special.log_ndtr(lower)
    log_sf_upper, log_sf_lower = torch.special.log_ndtr(-upper), torch.special.log_ndtr(-lower)
    middle = torch.where(lower > 0, log_sf_lower + _log1mexp(log_sf_upper - log_sf_lower),
                         log_cdf_upper + _log1mexp(log_cdf_lower - log_cdf_upper))
    return torch.where(x < -1 + half, log_cdf_upper, torch.where(x > 1 - half, log_sf_lower, middle))


# ----------------------------------------------------------------------------------------
# Units: nats, bits per dimension, dequantization


def bits_per_dim(nll: Tensor | float, dim: int) -> Tensor | float:
    """An NLL in nats over `dim` dimensions, in bits per dimension: nll / (dim ln 2)."""
    return nll / (dim * math.log(2))


def dequantization_offset(dim: int, levels: int = 256, data_range: float = 2.0) -> float:
    """Nats to add to the continuous NLL of uniformly dequantized data to bound the discrete NLL.

    A bin of width data_range / levels has probability >= exp(E_u[log p(x + u)]) * width
    (Jensen), so -log P(x) <= E_u[-log p(x + u)] + dim log(levels / data_range):
    log(128) per dimension for 8-bit data scaled to [-1, 1], i.e. 7 bits/dim.
    """
    return dim * math.log(levels / data_range)


def dequantize(x: Tensor, generator: torch.Generator | None = None, levels: int = 256) -> Tensor:
    """Uniform dequantization: x in [-1, 1] on the grid of `levels` values -> (k + u) / levels
    rescaled to [-1, 1), with k in {0, ..., levels-1} and u ~ U[0, 1) (Song et al. 2021's code)."""
    k = torch.round((x + 1) / 2 * (levels - 1))
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return 2 * (k + u) / levels - 1


# ----------------------------------------------------------------------------------------
# Evaluation hygiene


@contextmanager
def _evaluating(model: Denoiser) -> Iterator[None]:
    """Put an nn.Module in eval mode and restore its previous mode afterwards."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _chunks(x: Tensor, batch_size: int | None) -> list[Tensor]:
    return [x] if batch_size is None else list(torch.split(x, batch_size))


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    return generator if generator is not None else torch.Generator(device).manual_seed(0)


# ----------------------------------------------------------------------------------------
# 1. The variational bound


def reverse_variance(schedule: Schedule, variance: Literal["posterior", "beta"] = "posterior") -> Tensor:
    """sigma_t^2 of p(x_{t-1} | x_t) at every index, (T,) float64: beta_tilde_t ("posterior") or
    beta_t ("beta"), DDPM section 3.2. At t = 0, the decoder, beta_tilde_0 = 0 is replaced by
    beta_tilde at index 1, as DDPM's and improved DDPM's code do for both choices."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    ab, ab_prev = schedule.alpha_bar, schedule.alpha_bar_prev
    beta_tilde = (1 - ab_prev) / (1 - ab) * schedule.betas
    out = beta_tilde.clone() if variance == "posterior" else schedule.betas.clone()
    out[0] = beta_tilde[min(1, schedule.T - 1)]
    return out


def prior_kl(x0: Tensor, schedule: Schedule) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) summed over dimensions, (B,) nats (DDPM eq. 5)."""
    ab = float(schedule.alpha_bar[-1])
    kl = normal_kl(math.sqrt(ab) * x0.double(), 1 - ab, torch.zeros((), dtype=torch.float64), 1.0)
    return kl.reshape(len(x0), -1).sum(1)


def vlb_term(model: Denoiser, x0: Tensor, xt: Tensor, t: int, schedule: Schedule, *,
             prediction: Prediction = "eps", variance: Literal["posterior", "beta"] = "posterior",
             decoder: Literal["gaussian", "discretized"] = "gaussian", clip_x0: float | None = None) -> Tensor:
    """One term of the bound at index t for x_t given: L_{t-1} (t >= 1) or L_0 (t = 0), (B,) nats."""
    B = len(x0)
    t_batch = torch.full((B,), t, device=x0.device, dtype=torch.long)
    ab = broadcast(schedule.alpha_bar[t_batch.cpu()], xt.double())
    x0_hat, _ = predict_x0_eps(model(xt, t_batch.to(xt.dtype)).double(), xt.double(), ab, prediction)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
    var_p = float(reverse_variance(schedule, variance)[t])
    if t == 0:  # 3. the decoder: at t = 0 the posterior mean is x0_hat itself
        if decoder == "discretized":
            log_p = discretized_gaussian_log_likelihood(x0.double(), x0_hat, var_p)
        else:
            log_p = gaussian_log_likelihood(x0.double(), x0_hat, var_p)
        return -log_p.reshape(B, -1).sum(1)
    mean_q, var_q = q_posterior(x0.double(), xt.double(), t_batch, schedule)  # 2. the diffusion terms
    mean_p, _ = q_posterior(x0_hat, xt.double(), t_batch, schedule)
    return normal_kl(mean_q, var_q, mean_p, var_p).reshape(B, -1).sum(1)


@dataclass
class VLBTerms:
    """The bound's terms per sample, in nats summed over dimensions."""

    prior: Tensor  # (B,) L_T
    diffusion: Tensor  # (B, T-1): column t-1 is L_{t-1}, t = 1 .. T-1
    decoder: Tensor  # (B,) L_0 = -log p(x0 | x_1)

    @property
    def total(self) -> Tensor:
        """The negative ELBO, (B,): an upper bound on -log p(x0)."""
        return self.prior + self.diffusion.sum(1) + self.decoder


@torch.no_grad()
def vlb_terms(
    model: Denoiser,
    x0: Tensor,
    schedule: Schedule,
    *,
    prediction: Prediction = "eps",
    variance: Literal["posterior", "beta"] = "posterior",
    decoder: Literal["gaussian", "discretized"] = "gaussian",
    clip_x0: float | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> VLBTerms:
    """Every term of DDPM's bound (eq. 5) for each sample of x0, each KL estimated with one draw
    x_t ~ q(x_t | x0) (improved DDPM's `calc_bpd_loop`). NFE = T per sample.

    decoder="discretized" is DDPM's decoder for 8-bit data in [-1, 1] (eq. 13); "gaussian" a
    Gaussian density for continuous data.
    """
    g = _generator(generator, x0.device)
    T = schedule.T
    diffusion = torch.zeros(len(x0), T - 1, dtype=torch.float64, device=x0.device)
    decoder_nll = torch.zeros(len(x0), dtype=torch.float64, device=x0.device)
    with _evaluating(model):
        for t in tqdm(range(T - 1, -1, -1), disable=not progress, desc="bound"):
            lo = 0
            for x in _chunks(x0, batch_size):
                eps = torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
                xt = q_sample(x, torch.full((len(x),), t, device=x.device), eps, schedule)
                term = vlb_term(model, x, xt, t, schedule, prediction=prediction, variance=variance,
                                decoder=decoder, clip_x0=clip_x0)
                if t == 0:
                    decoder_nll[lo:lo + len(x)] = term
                else:
                    diffusion[lo:lo + len(x), t - 1] = term
                lo += len(x)
    return VLBTerms(prior_kl(x0, schedule), diffusion, decoder_nll)


# ----------------------------------------------------------------------------------------
# 2. Exact likelihood through the probability-flow ODE


def index_at_log_snr(schedule: Schedule, log_snr: float) -> float:
    """The fractional index s where `schedule.alpha_bar_at(s)` has log-SNR `log_snr` (its inverse)."""
    lam = schedule.log_snr.flip(0)  # increasing
    lo, hi = float(lam[0]), float(lam[-1])
    if not lo - 1e-9 * (hi - lo) <= log_snr <= hi + 1e-9 * (hi - lo):
        raise ValueError(f"log-SNR {log_snr:.4g} outside the schedule's range [{lo:.4g}, {hi:.4g}]")
    log_snr = min(max(log_snr, lo), hi)  # forgive the rounding of a solver's last step
    if schedule.T == 1:
        return 0.0
    j = min(int(torch.searchsorted(lam, torch.tensor(log_snr, dtype=lam.dtype))), schedule.T - 1)
    j = max(j, 1)  # lam[j - 1] <= log_snr <= lam[j]
    frac = (log_snr - float(lam[j - 1])) / float(lam[j] - lam[j - 1])
    return (schedule.T - 1) - (j - 1) - frac


def pf_ode_drift(model: Denoiser, x: Tensor, log_snr: float, schedule: Schedule, prediction: Prediction = "eps",
                 model_dtype: torch.dtype | None = None) -> Tensor:
    """dx/dlam of the probability-flow ODE at log-SNR lam (Song et al. 2021, eq. 13, for the VP SDE):

    dx/dlam = (sigma^2 x - sigma eps_hat(x, s(lam))) / 2,  sigma^2 = 1 - alpha_bar = sigmoid(-lam),

    from dx/dt = f x + g^2 / (2 sigma) eps_hat with f = dlog alpha/dt, g^2 = dsigma^2/dt - 2 f sigma^2
    (the form of DPM-Solver, Lu et al. 2022, eq. 2.4) and time t = lam. Computed in x's dtype (use
    float64: sigma^2 is ~1e-4 at s = 0); the model runs in `model_dtype` (default: x's).
    """
    s = index_at_log_snr(schedule, log_snr)
    s_batch = torch.full((x.shape[0],), s, dtype=torch.float64, device=x.device)
    ab = broadcast(schedule.alpha_bar_at(s_batch), x)  # = sigmoid(lam)
    x_in = x.to(model_dtype or x.dtype)
    pred = model(x_in, s_batch.to(x_in.dtype)).to(x.dtype)
    _, eps = predict_x0_eps(pred, x, ab, prediction)
    return 0.5 * ((1 - ab) * x - torch.sqrt(1 - ab) * eps)


@dataclass
class ODELikelihood:
    """What `ode_nll` measured, per sample."""

    nll: Tensor  # (B,) -log p(x) in nats
    prior_logp: Tensor  # (B,) log N(z; 0, I) at the end of the flow
    delta_logp: Tensor  # (B,) int div F ds: the log-volume change along the path
    z: Tensor  # (B, ...) where the flow took x, at s = T - 1 (log-SNR schedule.log_snr[-1])
    nfe: int  # evaluations of the ODE's right-hand side (each one network forward + backward passes)


def ode_nll(
    model: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    prediction: Prediction = "eps",
    trace: Literal["exact", "hutchinson"] = "exact",
    probe: Literal["rademacher", "gaussian"] = "rademacher",
    n_probes: int = 1,
    method: OdeMethod = "rk45",
    steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    batch_size: int | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> ODELikelihood:
    """Exact -log p(x) of the probability-flow ODE's model, in nats summed over dimensions, (B,).

    Integrates (x, log-density change) from s = 0 to T - 1 in log-SNR time (see the module
    docstring) with `odeint`; fixed-step methods take `steps` uniform steps in log-SNR. trace="exact" costs one backward pass per dimension (fine for 2-D data);
    "hutchinson" estimates div F = E_v[v^T (dF/dx) v] with `n_probes` probes v, Rademacher or
    Gaussian, drawn once per sample and kept along the path (FFJORD), an unbiased estimate.
    Samples are solved `batch_size` at a time; the adaptive solver shares its steps in a batch.
    """
    g = _generator(generator, x.device)
    lam_start, lam_end = float(schedule.log_snr[0]), float(schedule.log_snr[-1])
    nlls, priors, deltas, zs, nfe = [], [], [], [], 0
    with _evaluating(model):
        for xb in tqdm(_chunks(x, batch_size), disable=not progress, desc="ODE likelihood"):
            B, D = len(xb), xb[0].numel()
            if trace == "hutchinson":
                shape = (n_probes, B, D)
                v = (torch.randn(shape, generator=g, device=x.device, dtype=torch.float64) if probe == "gaussian"
                     else torch.randint(0, 2, shape, generator=g, device=x.device).double() * 2 - 1)
            elif trace != "exact":
                raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")

            def rhs(lam: float, y: Tensor) -> Tensor:  # y = (x flattened, log-density change): (B, D + 1)
                with torch.enable_grad():
                    xs = y[:, :D].detach().requires_grad_(True)
                    drift = pf_ode_drift(model, xs.reshape(xb.shape), lam, schedule, prediction, xb.dtype)
                    drift = drift.reshape(B, D)
                    if trace == "exact":  # tr(dF/dx) = sum_i dF_i/dx_i, one backward pass per i
                        div = sum(torch.autograd.grad(drift[:, i].sum(), xs, retain_graph=True)[0][:, i]
                                  for i in range(D))
                    else:  # v^T (dF/dx) v, one vector-Jacobian product per probe
                        div = sum((torch.autograd.grad((drift * vk).sum(), xs, retain_graph=True)[0] * vk).sum(1)
                                  for vk in v) / n_probes
                return torch.cat([drift.detach(), div.detach()[:, None]], 1)

            y0 = torch.cat([xb.reshape(B, D).double(), xb.new_zeros(B, 1, dtype=torch.float64)], 1)
            y1, n = odeint(rhs, y0, lam_start, lam_end, method=method, steps=steps, rtol=rtol, atol=atol)
            z, delta = y1[:, :D], y1[:, D]
            prior = gaussian_log_likelihood(z, torch.zeros(()), 1.0).sum(1)
            nlls.append(-(prior + delta))
            priors.append(prior)
            deltas.append(delta)
            zs.append(z.reshape(xb.shape).to(xb.dtype))
            nfe += n
    return ODELikelihood(torch.cat(nlls), torch.cat(priors), torch.cat(deltas), torch.cat(zs), nfe)


def ode_decoder_nll(
    model: Denoiser,
    x0: Tensor,
    schedule: Schedule,
    *,
    prediction: Prediction = "eps",
    decoder: Literal["gaussian", "discretized"] = "discretized",
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
    **ode_kwargs,
) -> Tensor:
    """An upper bound on -log p(x0) that uses the ODE's exact density for the noisy x_1 and the
    bound's decoder for the last step, (B,) nats, from one draw x_1 ~ q(x_1 | x0) per sample:

    -log p(x0) <= E_q[-log p_ODE(x_1) + L_0(x0 | x_1) - H[q(x_1 | x0)]],   (Jensen on p = int p_ODE p(x0 | x_1) dx_1)

    with H[q(x_1 | x0)] = dim / 2 log(2 pi e (1 - alpha_bar_0)). For 8-bit images this is the way to
    use the ODE of a discrete-time model: its density at s = 0 is blurred by sigma_0 (0.01 for
    DDPM's linear schedule), wider than an 8-bit bin (2 / 256), so a dequantized ODE likelihood
    cannot resolve the pixels, while the discretized decoder does. `ode_kwargs` go to `ode_nll`.
    """
    g = _generator(generator, x0.device)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype, device=x0.device)
    x1 = q_sample(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device), eps, schedule)
    ode = ode_nll(model, x1, schedule, prediction=prediction, generator=g, **ode_kwargs)
    with torch.no_grad(), _evaluating(model):
        l0 = vlb_term(model, x0, x1, 0, schedule, prediction=prediction, decoder=decoder, clip_x0=clip_x0)
    dim = x0[0].numel()
    entropy = 0.5 * dim * math.log(2 * math.pi * math.e * (1 - float(schedule.alpha_bar[0])))
    return ode.nll + l0 - entropy
