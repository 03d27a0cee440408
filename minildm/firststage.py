"""Training the first stage of latent diffusion: the autoencoder of `minildm.autoencoder`.

LDM (Rombach et al. 2022, Sec. 3.1 and Appendix G) trains its autoencoders with

    L = L_rec(x, D(E(x)))  +  regulariser  [+ perceptual loss + patch-adversarial loss]

where the regulariser is a small KL penalty toward N(0, I) (AutoencoderKL, weight 1e-6) or
the vector-quantization loss (VQAutoencoder: codebook + beta * commitment). The loss is a
dict of named terms, each with its weight in `FirstStageLoss`, so there is one training
loop for every first stage. The full objective of LDM (its `LPIPSWithDiscriminator`, from
taming-transformers' VQGAN, Esser et al. 2021, Eq. 7) is that loop with every term on:

    L_G = (rec_weight L_rec + perceptual_weight L_perc) / exp(s) + s      (s: learned log-variance,
          + kl_weight L_KL  (or vq_weight L_VQ)                             or s = 0 if not learned)
          + disc_weight * lambda * L_GAN          (from step disc_start on)
    L_D = discriminator_loss(D(x), D(x_rec))      (from step disc_start on, its own optimizer)

with lambda = `minildm.losses.adaptive_weight` at the decoder's last layer. The perceptual
distance is `minildm.perceptual.PerceptualDistance`; D a `minildm.losses.PatchDiscriminator`.
With the defaults (perceptual_weight = disc_weight = 0, no learned log-variance) the loop is
the plain L1 + regulariser training of lessons 04 and 05.

Units. LDM's KL loss sums the reconstruction error over the N = C * H * W pixel values and
the KL over the latent dimensions, per image. Here every term is divided by N (the rec term
is a mean per pixel value, easy to read), which changes no Adam step, so `kl_weight` means
what it means in LDM. The VQ term is the quantizer's mean, as in taming-transformers.

    model = AutoencoderKL(AutoencoderConfig(in_ch=3, ch=32, ch_mult=(1, 2, 2)))
    log = train_first_stage(model, batches(crops, batch_size=64), steps=500,
                            config=FirstStageLoss(kl_weight=1e-6), bf16=True)
    log.terms["rec"], log.terms["kl"], log.terms["loss"]  # one value per step

    # LDM's full recipe: + perceptual + patch adversarial with the adaptive weight
    config = FirstStageLoss(perceptual_weight=1.0, disc_weight=0.5, disc_start=500)
    log = train_first_stage(model, batches(crops, batch_size=64), steps=2000, config=config,
                            perceptual=default_perceptual_distance(),
                            discriminator=PatchDiscriminator(config.discriminator))
    log.terms["g_adv"], log.terms["lambda"], log.terms["d_loss"]  # 0 before disc_start
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from minildm.autoencoder import AutoencoderKL, DiagonalGaussian
from minildm.losses import (GanLoss, PatchDiscriminator, PatchDiscriminatorConfig, adaptive_weight,
                            discriminator_loss, generator_loss)
from minildm.perceptual import PerceptualDistance
from minildm.quantize import QuantizerOutput

TermFn = Callable[[Tensor, Tensor], Tensor]  # (x, x_rec) -> scalar loss term, unweighted
AfterStep = Callable[[int, Tensor, Tensor], Mapping[str, float] | None]  # (step, x, x_rec) -> logs


@dataclass
class FirstStageLoss:
    """The weight of each term of the first-stage loss (terms are named like the fields)."""

    reconstruction: Literal["l1", "l2"] = "l1"  # L1 is sharper; LDM uses L1 (+ LPIPS)
    rec_weight: float = 1.0  # mean |x - x_rec| (or squared) per pixel value
    kl_weight: float = 1e-6  # AutoencoderKL: LDM's 1e-6; 1 with L1 = the ELBO of a Laplace(b=1) decoder
    vq_weight: float = 1.0  # VQAutoencoder: the quantizer's loss (codebook + beta commitment)
    perceptual_weight: float = 0.0  # mean PerceptualDistance(x, x_rec); LDM: 1.0 (LPIPS); 0 = off
    disc_weight: float = 0.0  # weight of the adaptively weighted GAN term; LDM: 0.5; 0 = no discriminator
    disc_start: int = 0  # first step of the GAN term and of D's training (LDM: 50,001 steps)
    gan_loss: GanLoss = "hinge"  # "hinge" (LDM, VQGAN) or "non_saturating"
    adaptive_delta: float = 1e-4  # delta in lambda = |grad L_rec| / (|grad L_GAN| + delta)
    adaptive_max: float = 1e4  # lambda is clamped to [0, adaptive_max]
    learn_logvar: bool = False  # divide the rec + perceptual terms by exp(s) and add s, s learned (LDM)
    logvar_init: float = 0.0  # the initial s
    disc_lr: float | None = None  # D's Adam learning rate; None = the autoencoder's lr
    discriminator: PatchDiscriminatorConfig = field(default_factory=PatchDiscriminatorConfig)  # when disc_weight > 0

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}")
        for name in ("rec_weight", "kl_weight", "vq_weight", "perceptual_weight", "disc_weight",
                     "disc_start", "adaptive_delta", "adaptive_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.gan_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"gan_loss must be 'hinge' or 'non_saturating', got {self.gan_loss!r}")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ValueError(f"disc_lr must be > 0 or None, got {self.disc_lr}")
        if isinstance(self.discriminator, dict):  # as read back from a saved config
            self.discriminator = PatchDiscriminatorConfig(**self.discriminator)

    def weight(self, term: str) -> float:
        """The weight of a built-in term ("rec", "kl", "vq", "perceptual")."""
        if term not in ("rec", "kl", "vq", "perceptual"):
            raise KeyError(f"no built-in weight for the term {term!r}: give it in extra_weights "
                           f"(train_first_stage does so for 'g_adv': disc_weight * lambda)")
        return getattr(self, f"{term}_weight")


REC_TERMS = ("rec", "perceptual")  # the terms that the learned log-variance divides (LDM's nll_loss)


def first_stage_terms(model: nn.Module, x: Tensor, config: FirstStageLoss,
                      generator: torch.Generator | None = None,
                      perceptual: PerceptualDistance | None = None,
                      ) -> tuple[dict[str, Tensor], Tensor, DiagonalGaussian | QuantizerOutput]:
    """Run the autoencoder on x and return (terms, x_rec, posterior_or_quantizer_output).

    terms: named scalar losses, unweighted (combine them with `total_loss`), in float32:
        "rec"  mean reconstruction error per pixel value, |x - x_rec| or (x - x_rec)^2
        "kl"   AutoencoderKL: KL(q(z|x) || N(0, I)) in nats per image (summed over the latent
               dims, `DiagonalGaussian.kl`), mean over the batch, divided by N = C * H * W
        "vq"   VQAutoencoder: the quantizer's loss (codebook + beta * commitment)
        "perceptual"  if config.perceptual_weight > 0: mean `perceptual`(x, x_rec) over the batch

    The ELBO view: with L2 and kl_weight = 2 sigma^2 the total is 2 sigma^2 / N times the
    negative ELBO (up to a constant) of a VAE whose decoder is N(x_rec, sigma^2 I); with L1
    and kl_weight = b, b / N times that of a Laplace decoder of scale b. LDM's 1e-6 thus
    barely weighs the KL: it only keeps the latents from drifting to a high variance.
    """
    if isinstance(model, AutoencoderKL):
        x_rec, aux = model(x, generator=generator)  # aux: the posterior, a DiagonalGaussian
    else:
        x_rec, aux = model(x)  # VQAutoencoder: aux is the quantizer's QuantizerOutput
    x_rec32 = x_rec.float()
    terms = {}
    # 1. RECONSTRUCTION LOSS
    if config.reconstruction == "l1":
        terms["rec"] = F.l1_loss(x_rec32, x.float())
    else:
        terms["rec"] = F.mse_loss(x_rec32, x.float())
    # 2. LATENT REGULARISER: KL toward N(0, I), or the vector-quantization loss
    if isinstance(aux, DiagonalGaussian):
        terms["kl"] = aux.kl().mean() / x[0].numel()  # nats per image / pixel values per image
    else:
        terms["vq"] = aux.loss.float()
    # 3. PERCEPTUAL LOSS
    if config.perceptual_weight > 0:
        if perceptual is None:
            raise ValueError("config.perceptual_weight > 0 needs a perceptual distance: pass "
                             "perceptual=minildm.perceptual.default_perceptual_distance()")
        terms["perceptual"] = perceptual(x, x_rec).float().mean()
    return terms, x_rec, aux


def reconstruction_nll(terms: Mapping[str, Tensor], config: FirstStageLoss,
                       logvar: Tensor | None = None) -> Tensor:
    """LDM's nll_loss: (rec_weight * rec + perceptual_weight * perceptual) / exp(s) + s, with s
    the learned log-variance (`logvar`), or without division when logvar is None. With L1 this
    is, per pixel value, the negative log-likelihood of a Laplace decoder of scale exp(s), up
    to log 2: learning s balances the reconstruction against the other terms by itself."""
    rec = sum(config.weight(k) * terms[k] for k in REC_TERMS if k in terms)
    return rec if logvar is None else rec / torch.exp(logvar) + logvar


def total_loss(terms: Mapping[str, Tensor], config: FirstStageLoss,
               extra_weights: Mapping[str, float] | None = None,
               logvar: Tensor | None = None) -> Tensor:
    """`reconstruction_nll` + sum_k weight_k * term_k over the other terms, weights from
    `config` (built-in terms) or `extra_weights` (extra terms, and "g_adv": disc_weight * lambda)."""
    extra_weights = extra_weights or {}
    rest = sum(extra_weights[k] * v if k in extra_weights else config.weight(k) * v
               for k, v in terms.items() if k not in REC_TERMS)
    return reconstruction_nll(terms, config, logvar) + rest


def adversarial_weight(terms: dict[str, Tensor], x_rec: Tensor, discriminator: nn.Module,
                       last_layer: Tensor, config: FirstStageLoss, logvar: Tensor | None = None) -> Tensor:
    """The generator's side of VQGAN's Eq. 7: add terms["g_adv"] = L_GAN(D(x_rec)), with D
    frozen (gradients reach x_rec, not D), and return lambda, the adaptive weight of
    `minildm.losses.adaptive_weight` at `last_layer`; the term's weight is disc_weight * lambda."""
    discriminator.requires_grad_(False)
    terms["g_adv"] = generator_loss(discriminator(x_rec).float(), config.gan_loss)
    discriminator.requires_grad_(True)
    return adaptive_weight(reconstruction_nll(terms, config, logvar), terms["g_adv"], last_layer,
                           config.adaptive_delta, config.adaptive_max)


def discriminator_terms(discriminator: nn.Module, x: Tensor, x_rec: Tensor, config: FirstStageLoss
                        ) -> dict[str, Tensor]:
    """The discriminator's side: "d_loss" on the real batch x and the detached reconstruction,
    and the mean logits "logits_real", "logits_fake" (detached, for the log)."""
    logits_real, logits_fake = discriminator(x).float(), discriminator(x_rec.detach()).float()
    return {"d_loss": discriminator_loss(logits_real, logits_fake, config.gan_loss),
            "logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}


@dataclass
class FirstStageLog:
    """What `train_first_stage` measured: per step, every unweighted term, the weighted
    total ("loss") and, for a VQ model, the codebook "perplexity"; and the wall-clock time."""

    terms: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def append(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.terms.setdefault(k, []).append(float(v))


def train_first_stage(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, ...]],
    steps: int,
    config: FirstStageLoss | None = None,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.5, 0.9),
    grad_clip: float | None = None,
    bf16: bool = False,
    perceptual: PerceptualDistance | None = None,
    discriminator: PatchDiscriminator | None = None,
    extra_terms: Mapping[str, tuple[float, TermFn]] | None = None,
    after_step: AfterStep | None = None,
    max_seconds: float | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> FirstStageLog:
    """Train an AutoencoderKL or VQAutoencoder for `steps` steps (or until `max_seconds`).

    `batches` yields tuples whose first entry is a batch of images, as
    `minildm.data.batches` does. Adam with betas (0.5, 0.9), as LDM and VQGAN use.
    `bf16` runs the forward passes under bfloat16 autocast (about 2x faster on CPUs with
    AMX); the loss terms are computed in float32. `generator` draws the posterior samples
    z ~ q(z | x) (a seeded one makes the run reproducible).

    LDM's full objective (see the module docstring), switched on by `config`:
    perceptual: the PerceptualDistance of the "perceptual" term (config.perceptual_weight > 0);
    discriminator: the PatchDiscriminator (config.disc_weight > 0), trained here by its own
        Adam (lr config.disc_lr or lr, same betas) on the hinge / non-saturating loss. From
        step config.disc_start on, each step (1) updates the autoencoder (and s, the learned
        log-variance) on L_G, whose GAN term is weighted by disc_weight * lambda, lambda the
        adaptive weight at `model.decoder.conv_out.weight`, then (2) updates D on x and the
        detached x_rec of the same step. Before disc_start neither happens ("g_adv", "lambda",
        "d_loss", "logits_real", "logits_fake" are logged as 0).

    Other extensions, without a second loop:
    extra_terms: {name: (weight, fn(x, x_rec) -> scalar)}, added to the loss and logged;
    after_step: called as after_step(step, x, x_rec.detach()) after each optimizer step;
        it may return numbers to log.

    Logged per step (FirstStageLog.terms): every unweighted term, "loss" (L_G), "perplexity"
    (VQ), "logvar" (if learned), and with a discriminator "lambda", "d_loss" and the mean
    logits of D on the real and the reconstructed batch.
    """
    config = config or FirstStageLoss()
    extra_terms = dict(extra_terms or {})
    extra_weights = {k: w for k, (w, _) in extra_terms.items()}
    device = next(model.parameters()).device
    gan = config.disc_weight > 0
    if gan and discriminator is None:
        raise ValueError("config.disc_weight > 0 needs a discriminator: pass "
                         "discriminator=minildm.losses.PatchDiscriminator(config.discriminator)")
    if config.perceptual_weight > 0 and perceptual is None:
        raise ValueError("config.perceptual_weight > 0 needs a perceptual distance: pass "
                         "perceptual=minildm.perceptual.default_perceptual_distance()")
    logvar = (nn.Parameter(torch.tensor(config.logvar_init, device=device))
              if config.learn_logvar else None)
    params = list(model.parameters()) + ([logvar] if logvar is not None else [])
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    if gan:
        discriminator.to(device).train()
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.disc_lr or lr, betas=betas)
        last_layer = model.decoder.conv_out.weight  # GL of VQGAN's Eq. 7
    if perceptual is not None:
        perceptual.to(device)
    log = FirstStageLog()
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), disable=not progress, desc="first stage"):
        x = next(batches)[0].to(device)
        gan_on = gan and step >= config.disc_start
        # 1. THE AUTOENCODER'S (GENERATOR'S) STEP
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            terms, x_rec, aux = first_stage_terms(model, x, config, generator, perceptual)
            for name, (_, fn) in extra_terms.items():
                terms[name] = fn(x, x_rec).float()
            if gan_on:
                lam = adversarial_weight(terms, x_rec, discriminator, last_layer, config, logvar)
        weights = dict(extra_weights)
        if gan_on:
            weights["g_adv"] = config.disc_weight * lam
        loss = total_loss(terms, config, weights, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        values = {k: v.item() for k, v in terms.items()}
        values["loss"] = loss.item()
        if not isinstance(aux, DiagonalGaussian):  # a VQ model: how many codes are in use
            values["perplexity"] = float(aux.perplexity)
        if logvar is not None:
            values["logvar"] = logvar.item()
        # 2. THE DISCRIMINATOR'S STEP, on the same real batch and its detached reconstruction
        if gan and not gan_on:  # logged as 0 until disc_start, so every list has one value per step
            values.update(dict.fromkeys(("g_adv", "lambda", "d_loss", "logits_real", "logits_fake"), 0.0))
        if gan_on:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                d_terms = discriminator_terms(discriminator, x, x_rec, config)
            opt_d.zero_grad(set_to_none=True)
            d_terms["d_loss"].backward()
            opt_d.step()
            values.update({"lambda": lam.item(), **{k: v.item() for k, v in d_terms.items()}})
        if after_step is not None:
            values.update(after_step(step, x, x_rec.detach()) or {})
        log.append(values)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    model.eval()
    if gan:
        discriminator.eval()
    log.seconds = time.perf_counter() - start
    return log
