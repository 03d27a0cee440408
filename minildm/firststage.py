"""Training the first stage of latent diffusion: the autoencoder of `minildm.autoencoder`.

LDM (Rombach et al. 2022, Sec. 3.1 and Appendix G) trains its autoencoders with

    L = L_rec(x, D(E(x)))  +  regulariser  [+ perceptual loss + patch-adversarial loss]

where the regulariser is a small KL penalty toward N(0, I) (AutoencoderKL, weight 1e-6) or
the vector-quantization loss (VQAutoencoder: codebook + beta * commitment). The loss is a
dict of named terms, each with its weight in `FirstStageLoss`; lesson 06 adds the perceptual
and adversarial terms to the same dict (or, without editing this file, through
`extra_terms` and `after_step`), so there is one training loop for every first stage.

Units. LDM's KL loss sums the reconstruction error over the N = C * H * W pixel values and
the KL over the latent dimensions, per image. Here every term is divided by N (the rec term
is a mean per pixel value, easy to read), which changes no Adam step, so `kl_weight` means
what it means in LDM. The VQ term is the quantizer's mean, as in taming-transformers.

    model = AutoencoderKL(AutoencoderConfig(in_ch=3, ch=32, ch_mult=(1, 2, 2)))
    log = train_first_stage(model, batches(crops, batch_size=64), steps=500,
                            config=FirstStageLoss(kl_weight=1e-6), bf16=True)
    log.terms["rec"], log.terms["kl"], log.terms["loss"]  # one value per step
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

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}")
        for name in ("rec_weight", "kl_weight", "vq_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def weight(self, term: str) -> float:
        """The weight of a built-in term ("rec", "kl", "vq")."""
        return getattr(self, f"{term}_weight")


def first_stage_terms(model: nn.Module, x: Tensor, config: FirstStageLoss,
                      generator: torch.Generator | None = None
                      ) -> tuple[dict[str, Tensor], Tensor, DiagonalGaussian | QuantizerOutput]:
    """Run the autoencoder on x and return (terms, x_rec, posterior_or_quantizer_output).

    terms: named scalar losses, unweighted (combine them with `total_loss`), in float32:
        "rec"  mean reconstruction error per pixel value, |x - x_rec| or (x - x_rec)^2
        "kl"   AutoencoderKL: KL(q(z|x) || N(0, I)) in nats per image (summed over the latent
               dims, `DiagonalGaussian.kl`), mean over the batch, divided by N = C * H * W
        "vq"   VQAutoencoder: the quantizer's loss (codebook + beta * commitment)

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
    return terms, x_rec, aux


def total_loss(terms: Mapping[str, Tensor], config: FirstStageLoss,
               extra_weights: Mapping[str, float] | None = None) -> Tensor:
    """sum_k weight_k * term_k, weights from `config` (built-in terms) or `extra_weights`."""
    extra_weights = extra_weights or {}
    return sum(extra_weights[k] * v if k in extra_weights else config.weight(k) * v
               for k, v in terms.items())


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
    extra_terms: Mapping[str, tuple[float, TermFn]] | None = None,
    after_step: AfterStep | None = None,
    max_seconds: float | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> FirstStageLog:
    """Train an AutoencoderKL or VQAutoencoder for `steps` steps (or until `max_seconds`).

    `batches` yields tuples whose first entry is a batch of images, as
    `minildm.data.batches` does. Adam with betas (0.5, 0.9), as LDM and VQGAN use.
    `bf16` runs the forward pass under bfloat16 autocast (about 2x faster on CPUs with
    AMX); the loss terms are computed in float32. `generator` draws the posterior samples
    z ~ q(z | x) (a seeded one makes the run reproducible).

    Extensions (lesson 06), without a second loop:
    extra_terms: {name: (weight, fn(x, x_rec) -> scalar)}, added to the loss and logged
        (e.g. a perceptual distance, or a generator's adversarial term);
    after_step: called as after_step(step, x, x_rec.detach()) after each optimizer step;
        it may update another network (a patch discriminator) and return numbers to log.
    """
    config = config or FirstStageLoss()
    extra_terms = dict(extra_terms or {})
    extra_weights = {k: w for k, (w, _) in extra_terms.items()}
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
    device = next(model.parameters()).device
    log = FirstStageLog()
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), disable=not progress, desc="first stage"):
        x = next(batches)[0].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            terms, x_rec, aux = first_stage_terms(model, x, config, generator)
            for name, (_, fn) in extra_terms.items():
                terms[name] = fn(x, x_rec).float()
        loss = total_loss(terms, config, extra_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        values = {k: v.item() for k, v in terms.items()}
        values["loss"] = loss.item()
        if not isinstance(aux, DiagonalGaussian):  # a VQ model: how many codes are in use
            values["perplexity"] = float(aux.perplexity)
        if after_step is not None:
            values.update(after_step(step, x, x_rec.detach()) or {})
        log.append(values)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    model.eval()
    log.seconds = time.perf_counter() - start
    return log
