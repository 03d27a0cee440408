"""Classifier-free guidance (Ho & Salimans 2022): one network, conditional and unconditional.

Training (their Algorithm 1): with probability p_uncond the condition c of a training
example is replaced by the null condition (the extra "null" class, or the empty caption),
so the same network learns eps(x_t, c) and eps(x_t, null). `drop_condition` does that;
`minildm.train.train_denoiser(cond_dropout=p, null_cond=...)` calls it every step.

Sampling (their Eq. 6, written with the guidance scale s of LDM and Stable Diffusion,
s = 1 + w):

    eps_guided = eps(x_t, null) + s (eps(x_t, c) - eps(x_t, null))

s = 1 is the conditional model, s = 0 the unconditional one, s > 1 extrapolates away from
the unconditional prediction (sharper, more "on prompt", less diverse). The combination is
linear, so it is the same whether the network predicts eps, x0 or v (each is an affine
function of the others given x_t). `guided` returns a plain `model(xt, t)` closure, so
every sampler of `minildm.sampling` runs guided with no change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from minildm.diffusion import Denoiser

ConditionalModel = Callable[[Tensor, Tensor, Tensor], Tensor]  # model(xt, t, cond) -> prediction


def expand_null(null_cond: Tensor, cond: Tensor) -> Tensor:
    """The null condition repeated for every sample of `cond`: a single null (e.g. the class K
    as a 0-d tensor, or an empty caption (L,)) becomes cond's shape; a batch is checked."""
    null_cond = null_cond.to(cond.device)
    if null_cond.shape == cond.shape:
        return null_cond
    if null_cond.shape != cond.shape[1:]:
        raise ValueError(f"null_cond of shape {tuple(null_cond.shape)} fits neither cond {tuple(cond.shape)} "
                         f"nor one of its samples {tuple(cond.shape[1:])}")
    return null_cond.expand_as(cond)


def drop_condition(cond: Tensor, null_cond: Tensor, p: float, generator: torch.Generator | None = None,
                   *, rank: int = 0, world: int = 1) -> Tensor:
    """Replace each sample's condition by the null one with probability p (Ho & Salimans 2022,
    Algorithm 1, p_uncond; they found 0.1-0.2 best). cond (B, ...) -> (B, ...).

    The coin flips are drawn on the generator's device. In data-parallel training each of
    `world` processes holds B rows of a global batch of world * B: every process draws the
    flips of the whole global batch from the same generator and keeps its own rows
    (`rank`), so which rows are dropped does not depend on the number of processes.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the condition dropout rate must be in [0, 1], got {p}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world), got rank={rank}, world={world}")
    B = cond.shape[0]
    device = generator.device if generator is not None else cond.device
    flips = torch.rand(B * world, generator=generator, device=device)[rank * B:(rank + 1) * B]  # (B,)
    drop = (flips < p).to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))  # (B, 1, ..., 1)
    return torch.where(drop, expand_null(null_cond, cond), cond)


def guided(model: ConditionalModel, cond: Tensor, null_cond: Tensor, scale: float) -> Denoiser:
    """The classifier-free guided denoiser (xt, t) -> pred_null + scale (pred_cond - pred_null).

    cond (B, ...) holds one condition per sample of x_t; null_cond is one null condition or
    B of them. scale = 1 evaluates only the conditional model and scale = 0 only the
    unconditional one (1 NFE per call); any other scale runs both in one batch of 2B.
    """

    def denoise(xt: Tensor, t: Tensor) -> Tensor:
        B = xt.shape[0]
        if cond.shape[0] != B:
            raise ValueError(f"cond has {cond.shape[0]} conditions for a batch of {B} samples")
        if scale == 1.0:
            return model(xt, t, cond)
        null = expand_null(null_cond, cond)
        if scale == 0.0:
            return model(xt, t, null)
        t2 = t.expand(B) if t.ndim == 0 else t
        pred = model(torch.cat([xt, xt]), torch.cat([t2, t2]), torch.cat([cond, null]))  # (2B, ...)
        pred_cond, pred_null = pred.chunk(2)
        return pred_null + scale * (pred_cond - pred_null)

    return denoise
