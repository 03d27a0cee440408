"""What each stage trains: its network (`build_model`) and its loss terms per micro-batch.

    stage="diffusion"    a UNet denoiser, `diffusion_terms`: E w_t ||target - model(x_t, t, c)||^2
                         in pixel space, or in the latent space of a frozen first stage
                         (config.first_stage); unconditional, class- or text-conditional
    stage="autoencoder"  a KL or VQ first stage, `autoencoder_terms`: `minildm.firststage`'s terms,
                         with the perceptual and patch-adversarial terms of `FirstStageExtras`

Conditioning (LDM Sec. 3.3) is one argument, `model(x_t, t, cond)`: class labels (B,) long
(`unet.num_classes`, the digits) or token ids (B, L) long of the shapes' captions (a
`TextConditionedUNet`: the text encoder tau_theta is trained with the UNet). Each has a
"null" value (the extra class; the all-padding caption) that replaces the condition with
probability `diffusion.cond_drop` during training and is the unconditional input of
classifier-free guidance when sampling (`guided`).

The loop (`minildm.runner`) only calls these; the losses themselves live in
`minildm.diffusion` and `minildm.firststage`, the same code the notebooks train with.
"""

from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from minildm import checkpoint as ckpt
from minildm.autoencoder import (AutoencoderKL, VQAutoencoder, VQAutoencoderConfig, load_autoencoder,
                                 save_autoencoder)
from minildm.config import ConfigError, TrainConfig, from_dict
from minildm.diffusion import denoising_loss, q_sample
from minildm.distributed import Rank
from minildm.firststage import adversarial_weight, discriminator_terms, first_stage_terms, total_loss
from minildm.guidance import drop_condition, expand_null
from minildm.latent import null_condition
from minildm.rundata import channels_of
from minildm.schedules import Schedule, cosine_schedule, linear_schedule

FirstStage = AutoencoderKL | VQAutoencoder  # frozen, with its measured scale_factor


def build_model(config: TrainConfig, latent_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The trainable network of config.stage, on the CPU, initialised from torch's current
    generator. `latent_shape` (C, h, w): the first stage's latents for a latent diffusion run."""
    from minildm.unet import UNet  # heavy module, only for this stage
    if config.stage == "diffusion":
        u = config.unet
        c, size, where = channels_of(config), config.data.image_size, "the data has"
        if latent_shape is not None:
            c, size, where = latent_shape[0], latent_shape[1], "the first stage's latents have"
        if u.in_ch != c or u.out_ch != c:
            raise ConfigError(f"{where} {c} channel(s) but unet.in_ch={u.in_ch}, "
                              f"unet.out_ch={u.out_ch}; set --unet.in_ch={c} --unet.out_ch={c}")
        if u.image_size != size:
            raise ConfigError(f"unet.image_size={u.image_size}, but {where} side {size}; "
                              f"set --unet.image_size={size}")
        if u.num_classes is not None and config.data.source == "shapes":
            raise ConfigError("unet.num_classes: class labels come with data.source=digits, or a folder "
                              "with data.class_subfolders; the shapes come with captions (text=...)")
        if config.text is not None:
            from minildm.text import TextConditionedUNet, TextEncoder
            if config.data.source == "digits":
                raise ConfigError("text conditioning needs captions: data.source=shapes, or a folder "
                                  "with data.captions")
            if u.context_dim != config.text.dim:
                raise ConfigError(f"unet.context_dim={u.context_dim} must equal text.dim={config.text.dim}")
            n_words = len(config.text.tokenizer())
            if config.text.vocab_size < n_words:
                raise ConfigError(f"text.vocab_size={config.text.vocab_size}, but the vocabulary "
                                  f"has {n_words} words; set --text.vocab_size={n_words}")
            return TextConditionedUNet(UNet(u), TextEncoder(config.text))
        if u.context_dim is not None:
            raise ConfigError("unet.context_dim is set but there is no text encoder: set text=TextEncoderConfig(...)")
        return UNet(u)
    if config.autoencoder.in_ch != channels_of(config):
        c = channels_of(config)
        raise ConfigError(f"the data has {c} channel(s) but autoencoder.in_ch={config.autoencoder.in_ch}; "
                          f"set --autoencoder.in_ch={c}")
    if config.quantizer is not None:
        fields = {k: getattr(config.autoencoder, k) for k in config.autoencoder.__dataclass_fields__}
        return VQAutoencoder(VQAutoencoderConfig(**fields, quantizer=config.quantizer))
    return AutoencoderKL(config.autoencoder)


def make_schedule(config: TrainConfig) -> Schedule:
    d = config.diffusion
    return linear_schedule(d.T) if d.schedule == "linear" else cosine_schedule(d.T)


# ----------------------------------------------------------------------------------------
# conditioning

def null_cond_like(net: nn.Module, cond: Tensor) -> Tensor:
    """`minildm.latent.null_condition` of the (unwrapped) network, one per row of cond."""
    return expand_null(null_condition(net), cond)


# ----------------------------------------------------------------------------------------
# the frozen first stage of a latent run

def load_first_stage(path: str | Path) -> FirstStage:
    """The autoencoder at `path`, frozen in eval mode: a file written by
    `minildm.autoencoder.save_autoencoder` (e.g. data/checkpoints/ae_digits_f4.pt), an
    autoencoder run folder (its newest checkpoint) or one of its step_* folders.
    A missing, damaged or unsafe file, or a run of another stage, is a CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise ckpt.CheckpointError(f"first_stage {p} does not exist; point --first_stage at an autoencoder "
                                   "run folder or a .pt file written by save_autoencoder")
    if p.is_dir():
        c = ckpt.read_checkpoint(p)
        if c.config.get("stage") != "autoencoder":
            raise ckpt.CheckpointError(f"first_stage {c.path} is a stage={c.config.get('stage')} run, "
                                       "not an autoencoder; train one with stage=autoencoder first")
        config = from_dict(c.config)
        model = build_model(config)
        ckpt.load_weights(model, c.model, c.path)
    else:
        model = first_stage_from_bytes(p.read_bytes(), p)
    return model.requires_grad_(False).eval()


def first_stage_from_bytes(data: bytes, where: Path) -> FirstStage:
    """`load_autoencoder` on bytes (a file's, or a checkpoint's first_stage.pt), with every
    failure (truncated, not an autoencoder file, a pickled object) a CheckpointError."""
    try:
        return load_autoencoder(io.BytesIO(data))[0]
    except pickle.UnpicklingError as e:
        raise ckpt.CheckpointError(f"refusing to load first stage {where}: it holds a pickled object that "
                                   f"could run code ({str(e).splitlines()[0] if str(e) else e})") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ckpt.CheckpointError(f"cannot read first stage {where} (truncated, or not a file of "
                                   f"save_autoencoder?): {type(e).__name__}: {reason}") from None


def first_stage_bytes(first_stage: FirstStage) -> bytes:
    """The first stage as `save_autoencoder` writes it (with its scale_factor), for the checkpoint."""
    buf = io.BytesIO()
    save_autoencoder(first_stage, buf)
    return buf.getvalue()


def check_first_stage(first_stage: FirstStage, config: TrainConfig) -> tuple[int, int, int]:
    """The latent shape (C, h, w) of config.data's images; ConfigError if they do not fit."""
    fc, c, size = first_stage.config, channels_of(config), config.data.image_size
    if fc.in_ch != c:
        raise ConfigError(f"the first stage {config.first_stage} reads {fc.in_ch}-channel images, "
                          f"but data.source={config.data.source} has {c}")
    f = fc.downsampling_factor
    if size % f:
        raise ConfigError(f"data.image_size={size} is not divisible by the first stage's factor f={f}")
    return fc.latent_shape(size)


@torch.no_grad()
def encode(first_stage: FirstStage, x: Tensor, g: torch.Generator) -> Tensor:
    """Scaled latents scale_factor * z of images x (LDM Sec. 4.3.2), z ~ q(z | x) drawn from g."""
    return first_stage.encode_latents(x, g).float()


# ----------------------------------------------------------------------------------------
# the loss terms of a micro-batch

def diffusion_terms(model: nn.Module, x0: Tensor, cond: Tensor | None, null: Tensor | None,
                    schedule: Schedule, config: TrainConfig, g: torch.Generator, r: Rank) -> dict[str, Tensor]:
    """{"loss": E w_t ||target - model(x_t, t, c)||^2} (DDPM Algorithm 1; LDM Eq. 2 / 3 on
    latents), t, eps and the condition dropout drawn from `g` for the whole global
    micro-batch and sliced to this rank's rows. x0 (m, C, H, W): images or scaled latents;
    cond (m,) labels or (m, L) token ids, or None; null: the null condition, cond's shape."""
    d, m = config.diffusion, x0.shape[0]
    G = m * r.world
    t_all = torch.randint(0, schedule.T, (G,), device=x0.device, generator=g)
    eps_all = torch.randn((G, *x0.shape[1:]), device=x0.device, generator=g)
    t, eps = t_all[r.rank * m:(r.rank + 1) * m], eps_all[r.rank * m:(r.rank + 1) * m]
    xt = q_sample(x0, t, eps, schedule)
    if cond is None:
        pred = model(xt, t.to(x0.dtype))
    else:
        if d.cond_drop > 0:
            cond = drop_condition(cond, null, d.cond_drop, g, rank=r.rank, world=r.world)
        pred = model(xt, t.to(x0.dtype), cond)
    return {"loss": denoising_loss(pred, x0, eps, t, schedule, d.prediction, d.weighting)}


@dataclass
class FirstStageExtras:
    """What the autoencoder stage trains or reads beside the autoencoder (LDM Sec. 3.1, VQGAN
    Eq. 7), each None when its weight in config.loss is 0:

    perceptual     the frozen PerceptualDistance of the "perceptual" term (RGB images)
    discriminator  the PatchDiscriminator (config.loss.disc_weight > 0), its own optimizer in the loop
    logvar         the learned log-variance s of the reconstruction NLL (config.loss.learn_logvar)
    """

    perceptual: nn.Module | None = None
    discriminator: nn.Module | None = None
    logvar: nn.Parameter | None = None

    @staticmethod
    def build(config: TrainConfig, device: torch.device) -> FirstStageExtras:
        """The pieces config.loss switches on, on `device`; the discriminator is initialised from
        torch's current generator (after the autoencoder, so that its weights do not change)."""
        lo = config.loss
        extras = FirstStageExtras()
        if config.stage != "autoencoder":
            return extras
        if lo.perceptual_weight > 0:
            if channels_of(config) != 3:
                raise ConfigError("loss.perceptual_weight > 0 needs RGB images (the perceptual net reads 3 "
                                  f"channels), but data.source={config.data.source} has 1; set --loss.perceptual_weight=0")
            from minildm.perceptual import default_perceptual_distance
            extras.perceptual = default_perceptual_distance(device)
        if lo.disc_weight > 0:
            from minildm.losses import PatchDiscriminator
            if lo.discriminator.in_ch != channels_of(config):
                c = channels_of(config)
                raise ConfigError(f"the data has {c} channel(s) but loss.discriminator.in_ch={lo.discriminator.in_ch}; "
                                  f"set --loss.discriminator.in_ch={c}")
            extras.discriminator = PatchDiscriminator(lo.discriminator).to(device)
        if lo.learn_logvar:
            extras.logvar = nn.Parameter(torch.tensor(float(lo.logvar_init), device=device))
        return extras


def autoencoder_terms(model: nn.Module, net: nn.Module, x: Tensor, config: TrainConfig, g: torch.Generator,
                      extras: FirstStageExtras, disc: nn.Module | None = None, gan_on: bool = False
                      ) -> dict[str, Tensor]:
    """The first-stage terms of `minildm.firststage` (rec, kl or vq, perceptual) and, from
    loss.disc_start on, the patch-adversarial ones, as `train_first_stage` computes them:

        "loss"    L_G = total_loss(terms, lambda-weighted g_adv, logvar)   (the autoencoder's)
        "d_loss"  discriminator_loss(D(x), D(x_rec.detach()))              (D's; its own optimizer)
        "g_adv", "lambda", "logits_real", "logits_fake"; "logvar" if learned

    The two losses touch disjoint parameters (D is frozen in the generator's pass, x_rec is
    detached in D's), so one backward of their sum equals VQGAN's two separate steps.
    `model` may be a DDP or compiled wrapper of `net`; `disc` of extras.discriminator.
    Through a wrapper the KL posterior samples from torch's generator (reseeded per step)."""
    lo = config.loss
    D = extras.discriminator
    terms, x_rec, _ = first_stage_terms(model, x, lo, g, extras.perceptual)
    weights: dict[str, Tensor] = {}
    if D is not None and gan_on:
        lam = adversarial_weight(terms, x_rec, D, net.decoder.conv_out.weight, lo, extras.logvar)
        weights["g_adv"] = lo.disc_weight * lam
    terms["loss"] = total_loss(terms, lo, weights, extras.logvar)
    if D is not None:
        if gan_on:
            terms["lambda"] = lam
            terms.update(discriminator_terms(disc or D, x, x_rec, lo))
        else:  # logged as 0 before disc_start, as train_first_stage does
            zero = x.new_zeros((), dtype=torch.float32)
            terms.update(dict.fromkeys(("g_adv", "lambda", "d_loss", "logits_real", "logits_fake"), zero))
    if extras.logvar is not None:
        terms["logvar"] = extras.logvar.detach().float()
    return terms


# ----------------------------------------------------------------------------------------
# sampling

@torch.no_grad()
def sample_images(net: nn.Module, config: TrainConfig, n: int, cond: Tensor | None = None,
                  guidance: float = 1.0, sampler: str = "ddim", steps: int = 50,
                  first_stage: FirstStage | None = None, generator: torch.Generator | None = None) -> Tensor:
    """n images (B, C, S, S) in [-1, 1] from a diffusion network: `minildm.latent.LatentDiffusion`
    (the first stage, or None for pixels) samples with `sampler` from noise drawn from the CPU
    `generator`, with classifier-free guidance scale `guidance` when `cond` (n conditions)
    is given, and decodes. Pixel samplers keep x0_hat in [-1, 1] (DDPM's clipping);
    latents are not clipped, their range is not [-1, 1]."""
    from minildm.latent import LatentDiffusion
    from minildm.sampling import sample_ddim, sample_ddpm, sample_heun
    samplers = {"ddim": sample_ddim, "ddpm": sample_ddpm, "heun": sample_heun,
                "heun_edm": functools.partial(sample_heun, rho=7.0)}  # EDM's noise levels
    if sampler not in samplers:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(samplers)}")
    fn = samplers[sampler] if first_stage is not None else functools.partial(samplers[sampler], clip_x0=1.0)
    schedule = make_schedule(config)
    ldm = LatentDiffusion(first_stage, net, schedule, config.diffusion.prediction)
    return ldm.sample(cond, None if cond is not None else n, image_size=config.data.image_size,
                      guidance_scale=guidance, sampler=fn, steps=None if sampler == "ddpm" else min(steps, schedule.T),
                      generator=generator)
