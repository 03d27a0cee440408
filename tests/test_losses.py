"""The patch discriminator, the GAN losses and the adaptive weight, each against a hand
computation or a property that must hold."""

import math

import pytest
import torch
from torch import nn

from minildm.losses import (PatchDiscriminator, PatchDiscriminatorConfig, adaptive_weight, discriminator_loss,
                            generator_loss, receptive_field)


# -----------------------------------------------------------------------------
# patch discriminator

@pytest.mark.parametrize("n_layers, hand", [
    (1, 16),  # output conv 4 -> stride-1 conv (4-1)*1+4 = 7 -> stride-2 conv (7-1)*2+4 = 16
    (2, 34),  # ... 16 -> (16-1)*2+4 = 34
    (3, 70),  # ... 34 -> (34-1)*2+4 = 70: pix2pix's 70 x 70 PatchGAN
])
def test_receptive_field_against_a_hand_count(n_layers, hand):
    assert receptive_field(PatchDiscriminatorConfig(n_layers=n_layers)) == hand


@pytest.mark.parametrize("n_layers", [1, 2])
def test_receptive_field_is_where_the_gradient_reaches(n_layers):
    """Independent check: the gradient of one central logit is nonzero exactly on a
    receptive_field x receptive_field square (weights all positive, no BatchNorm)."""
    cfg = PatchDiscriminatorConfig(in_ch=1, ndf=4, n_layers=n_layers, norm="none")
    D = PatchDiscriminator(cfg)
    for p in D.parameters():
        p.data.fill_(0.1)
    x = torch.ones(1, 1, 96, 96, requires_grad=True)
    out = D(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows, cols = (x.grad[0, 0] != 0).nonzero().unbind(1)
    assert rows.max() - rows.min() + 1 == receptive_field(cfg)
    assert cols.max() - cols.min() + 1 == receptive_field(cfg)


def test_discriminator_output_map_shape():
    D = PatchDiscriminator(PatchDiscriminatorConfig(ndf=8, n_layers=3))
    assert D(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # pix2pix's 30 x 30 map at 256 px


# -----------------------------------------------------------------------------
# GAN losses and the adaptive weight

def test_hinge_and_non_saturating_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = [0, 0.5, 2], mean 5/6; relu(1 + fake) = [0, 1, 2], mean 1
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"), torch.tensor(0.5 * (5 / 6 + 1)))
    torch.testing.assert_close(generator_loss(fake, "hinge"), torch.tensor(1 / 3))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    d_ns = 0.5 * ((sp(-2) + sp(-0.5) + sp(1)) / 3 + (sp(-2) + sp(0) + sp(1)) / 3)
    torch.testing.assert_close(discriminator_loss(real, fake, "non_saturating"), torch.tensor(d_ns))
    torch.testing.assert_close(generator_loss(fake, "non_saturating"), torch.tensor((sp(2) + sp(0) + sp(-1)) / 3))
    with pytest.raises(ValueError, match="'hinge' or 'non_saturating'"):
        generator_loss(fake, "wgan")


def test_adaptive_weight_against_a_hand_computation():
    """L_rec = 1/2 ||W||^2 has gradient W; L_GAN = 3 sum(W) has gradient 3 everywhere."""
    torch.manual_seed(0)
    W = nn.Conv2d(4, 3, 3).weight  # a decoder's last layer
    rec, gan = 0.5 * W.square().sum(), 3.0 * W.sum()
    hand = W.detach().norm() / (3.0 * math.sqrt(W.numel()) + 1e-4)
    torch.testing.assert_close(adaptive_weight(rec, gan, W), hand)
    assert adaptive_weight(rec, gan, W, max_weight=0.01) == 0.01  # clamped
    assert not adaptive_weight(rec, gan, W).requires_grad


