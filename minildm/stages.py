"""What each stage trains: its network (`build_model`) and its loss terms per micro-batch.

    stage="diffusion"    a UNet denoiser, `diffusion_terms`: E w_t ||target - model(x_t, t)||^2
    stage="autoencoder"  a KL or VQ first stage, `autoencoder_terms`: `minildm.firststage`'s terms

The loop (`minildm.runner`) only calls these; the losses themselves live in
`minildm.diffusion` and `minildm.firststage`, the same code the notebooks train with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minildm.autoencoder import AutoencoderKL, VQAutoencoder, VQAutoencoderConfig
from minildm.config import ConfigError, TrainConfig
from minildm.diffusion import extract, q_sample, target
from minildm.distributed import Rank
from minildm.firststage import first_stage_terms, total_loss
from minildm.rundata import channels_of
from minildm.schedules import Schedule, cosine_schedule, linear_schedule
from minildm.weighting import loss_weight


def build_model(config: TrainConfig) -> nn.Module:
    """The network of config.stage, on the CPU, initialised from torch's current generator."""
    from minildm.unet import UNet  # heavy module, only for this stage
    c = channels_of(config)
    if config.stage == "diffusion":
        if config.unet.in_ch != c or config.unet.out_ch != c:
            raise ConfigError(f"the data has {c} channel(s) but unet.in_ch={config.unet.in_ch}, "
                              f"unet.out_ch={config.unet.out_ch}; set --unet.in_ch={c} --unet.out_ch={c}")
        if config.unet.image_size != config.data.image_size:
            raise ConfigError(f"unet.image_size={config.unet.image_size} differs from "
                              f"data.image_size={config.data.image_size}")
        return UNet(config.unet)
    if config.autoencoder.in_ch != c:
        raise ConfigError(f"the data has {c} channel(s) but autoencoder.in_ch={config.autoencoder.in_ch}; "
                          f"set --autoencoder.in_ch={c}")
    if config.quantizer is not None:
        fields = {k: getattr(config.autoencoder, k) for k in config.autoencoder.__dataclass_fields__}
        return VQAutoencoder(VQAutoencoderConfig(**fields, quantizer=config.quantizer))
    return AutoencoderKL(config.autoencoder)


def make_schedule(config: TrainConfig) -> Schedule:
    d = config.diffusion
    return linear_schedule(d.T) if d.schedule == "linear" else cosine_schedule(d.T)


def diffusion_terms(model: nn.Module, x0: Tensor, schedule: Schedule, config: TrainConfig,
                    g: torch.Generator, r: Rank) -> dict[str, Tensor]:
    """{"loss": E w_t ||target - model(x_t, t)||^2} (DDPM Algorithm 1), t and eps drawn from
    `g` for the whole global micro-batch and sliced to this rank's rows."""
    d, m = config.diffusion, x0.shape[0]
    G = m * r.world
    t_all = torch.randint(0, schedule.T, (G,), device=x0.device, generator=g)
    eps_all = torch.randn((G, *x0.shape[1:]), device=x0.device, generator=g)
    t, eps = t_all[r.rank * m:(r.rank + 1) * m], eps_all[r.rank * m:(r.rank + 1) * m]
    xt = q_sample(x0, t, eps, schedule)
    pred = model(xt, t.to(x0.dtype))
    err = (pred.float() - target(x0, eps, extract(schedule.alpha_bar, t, x0), d.prediction).float()).pow(2)
    if d.weighting == "simple":
        return {"loss": err.mean()}
    w = loss_weight(schedule, t.cpu(), d.weighting, d.prediction).to(err.device, err.dtype)  # (m,)
    return {"loss": (w * err.reshape(m, -1).mean(1)).mean()}


def autoencoder_terms(model: nn.Module, x: Tensor, config: TrainConfig, g: torch.Generator) -> dict[str, Tensor]:
    """The first-stage terms of `minildm.firststage` and their weighted sum "loss". Through a
    DDP or compiled wrapper the KL posterior samples from torch's generator (reseeded per step)."""
    terms, _, _ = first_stage_terms(model, x, config.loss, g)
    terms["loss"] = total_loss(terms, config.loss)
    return terms

