"""The patch-based adversarial objective of LDM's first stage (Rombach et al. 2022, Sec. 3.1).

LDM trains its autoencoder with "a perceptual loss and a patch-based adversarial objective",
which keeps reconstructions on the image manifold by enforcing local realism (taming-
transformers' VQGAN recipe, Esser et al. 2021, Sec. 3.1 and Eq. 7). This module holds the
adversarial half; the perceptual distance is in `minildm.perceptual`, and
`minildm.firststage.train_first_stage` puts them together in one training loop.

- `PatchDiscriminator`: pix2pix's N-layer "PatchGAN" (Isola et al. 2017): a fully
  convolutional net whose output is a map of logits, one per overlapping image patch of
  `receptive_field(config)` pixels, each saying "real" (> 0) or "reconstructed" (< 0).
- `discriminator_loss` / `generator_loss`: the hinge loss (Lim & Ye 2017; VQGAN, LDM) and
  the non-saturating loss (Goodfellow et al. 2014, Sec. 3).
- `adaptive_weight`: VQGAN's Eq. 7, lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta),
  gradients taken at the decoder's last layer GL, so the adversarial term can never drown
  the reconstruction term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GanLoss = Literal["hinge", "non_saturating"]


# -----------------------------------------------------------------------------
# 1. THE PATCH DISCRIMINATOR

@dataclass
class PatchDiscriminatorConfig:
    in_ch: int = 3  # image channels
    ndf: int = 64  # width of the first conv; doubles per layer, capped at 8 ndf (pix2pix)
    n_layers: int = 3  # stride-2 convs; 3 is pix2pix's 70 x 70 PatchGAN, fewer = smaller patches
    norm: Literal["batch", "none"] = "batch"  # BatchNorm after every inner conv (pix2pix, taming), or none

    def __post_init__(self):
        for name in ("in_ch", "ndf", "n_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {self.norm!r}")


def discriminator_layers(config: PatchDiscriminatorConfig) -> list[tuple[int, int]]:
    """(kernel, stride) of each conv of the PatchDiscriminator, input to output:
    n_layers stride-2 4x4 convs, then a stride-1 4x4 conv, then the stride-1 4x4 conv to logits."""
    return [(4, 2)] * config.n_layers + [(4, 1), (4, 1)]


def receptive_field(config: PatchDiscriminatorConfig) -> int:
    """Side in pixels of the image patch that one output logit sees.

    Walking back from one output position: a conv of kernel k and stride s turns a window of
    r positions of its output into (r - 1) s + k positions of its input. For n_layers = 3:
    1 -> 4 -> 7 -> 16 -> 34 -> 70, pix2pix's 70 x 70 PatchGAN."""
    r = 1
    for k, s in reversed(discriminator_layers(config)):
        r = (r - 1) * s + k
    return r


class PatchDiscriminator(nn.Module):
    """pix2pix's NLayerDiscriminator (as in taming-transformers): images (B, in_ch, H, W) ->
    logits (B, 1, H', W'), one per patch; conv 4x4 with padding 1, LeakyReLU(0.2), weights
    drawn from N(0, 0.02) (BatchNorm scales from N(1, 0.02)), as pix2pix initialises them."""

    def __init__(self, config: PatchDiscriminatorConfig = PatchDiscriminatorConfig()):
        super().__init__()
        self.config = cfg = config
        norm = (lambda c: nn.BatchNorm2d(c)) if cfg.norm == "batch" else (lambda c: nn.Identity())
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_ch, cfg.ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = cfg.ndf
        for n in range(1, cfg.n_layers + 1):  # n_layers - 1 stride-2 convs, then one of stride 1
            out = cfg.ndf * min(2 ** n, 8)
            stride = 2 if n < cfg.n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=cfg.norm == "none"), norm(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))  # the logit map
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 1, H', W') for images x (B, in_ch, H, W); > 0 means "looks real"."""
        return self.net(x)


# -----------------------------------------------------------------------------
# 2. GAN LOSSES

def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: GanLoss = "hinge") -> Tensor:
    """The discriminator's loss, a scalar, averaged over the batch and the patch map:

        hinge           1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])   (taming's hinge_d_loss)
        non_saturating  1/2 (E[softplus(-D(x))] + E[softplus(D(x_rec))])  = the cross-entropy of
                        calling x real and x_rec fake (Goodfellow et al. 2014, Eq. 1)
    """
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"kind must be 'hinge' or 'non_saturating', got {kind!r}")


def generator_loss(logits_fake: Tensor, kind: GanLoss = "hinge") -> Tensor:
    """The generator's (decoder's) adversarial loss L_GAN, a scalar:

        hinge           -E[D(x_rec)]               (taming, LDM)
        non_saturating  E[softplus(-D(x_rec))] = -E[log sigmoid(D(x_rec))]   (Goodfellow et al.
                        2014, Sec. 3: strong gradients while D still rejects x_rec)
    """
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"kind must be 'hinge' or 'non_saturating', got {kind!r}")


# -----------------------------------------------------------------------------
# 3. THE ADAPTIVE WEIGHT

def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor,
                    delta: float = 1e-4, max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta), clamped to [0, max_weight]
    and detached (VQGAN, Esser et al. 2021, Eq. 7; taming's `calculate_adaptive_weight`).

    GL = `last_layer`, the weight of the decoder's last conv (`model.decoder.conv_out.weight`).
    Scaling L_GAN by lambda makes its gradient at GL as large as the reconstruction term's, so
    the adversarial term can neither vanish nor dominate, whatever the scale of D's logits.
    Both losses must still have their graphs (they are kept for the backward pass).
    """
    g_rec, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_gan, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    lam = g_rec.float().norm() / (g_gan.float().norm() + delta)
    return lam.clamp(0.0, max_weight).detach()
