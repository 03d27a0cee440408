"""The first-stage training loop: it lowers the loss on a tiny problem, logs every term,
weighs the terms as documented, and takes extra terms without a second loop; with a
perceptual distance, a patch discriminator (start step, adaptive weight) and a learned
log-variance, for the KL and the VQ autoencoder alike."""

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, VQAutoencoder, VQAutoencoderConfig
from minildm.data import batches
from minildm.firststage import FirstStageLoss, first_stage_terms, total_loss, train_first_stage
from minildm.losses import PatchDiscriminator, PatchDiscriminatorConfig, generator_loss
from minildm.perceptual import PerceptualDistance, PerceptualNet
from minildm.quantize import QuantizerConfig


def blobs(n=64, size=8, seed=0) -> torch.Tensor:
    """Smooth random images (n, 1, size, size) in [-1, 1]: easy to compress."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, 2, 2, generator=g)
    return torch.tanh(F.interpolate(low, size=size, mode="bilinear", align_corners=False))


def kl_model(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(in_ch=1, ch=8, ch_mult=(1, 2), z_ch=2, groups=4, attn_mid=False))


def test_terms_and_their_weights():
    model, x = kl_model(), blobs(4)
    config = FirstStageLoss(reconstruction="l2", kl_weight=0.5)
    g = torch.Generator().manual_seed(0)
    terms, x_rec, posterior = first_stage_terms(model, x, config, g)
    assert set(terms) == {"rec", "kl"}
    torch.testing.assert_close(terms["rec"], (x - x_rec).square().mean())
    torch.testing.assert_close(terms["kl"], posterior.kl().mean() / 64)  # / pixel values per image
    torch.testing.assert_close(total_loss(terms, config), terms["rec"] + 0.5 * terms["kl"])
    l1 = first_stage_terms(model, x, FirstStageLoss(), torch.Generator().manual_seed(0))[0]["rec"]
    torch.testing.assert_close(l1, (x - x_rec).abs().mean())  # same generator, same sample


def test_training_reduces_the_loss_and_logs_every_term():
    model, x = kl_model(), blobs(64)
    log = train_first_stage(model, batches(x, batch_size=16), steps=60, config=FirstStageLoss(kl_weight=1e-3),
                            lr=3e-3, generator=torch.Generator().manual_seed(0))
    assert set(log.terms) == {"rec", "kl", "loss"} and all(len(v) == 60 for v in log.terms.values())
    first, last = torch.tensor(log.terms["loss"][:5]).mean(), torch.tensor(log.terms["loss"][-5:]).mean()
    assert last < 0.5 * first
    assert not model.training and log.seconds > 0


def test_training_is_reproducible_with_a_seeded_generator():
    logs = []
    for _ in range(2):
        model = kl_model()
        logs.append(train_first_stage(model, batches(blobs(32), batch_size=8), steps=3,
                                      generator=torch.Generator().manual_seed(1)).terms["loss"])
    assert logs[0] == logs[1]


def test_vq_training_logs_the_quantizer_terms():
    torch.manual_seed(0)
    model = VQAutoencoder(VQAutoencoderConfig(in_ch=1, ch=8, ch_mult=(1, 2), z_ch=2, groups=4, attn_mid=False,
                                              quantizer=QuantizerConfig(num_codes=8, dim=2)))
    log = train_first_stage(model, batches(blobs(32), batch_size=8), steps=20, lr=3e-3, bf16=True)
    assert set(log.terms) == {"rec", "vq", "loss", "perplexity"}
    assert all(1.0 <= p <= 8.0 for p in log.terms["perplexity"])
    assert log.terms["rec"][-1] < log.terms["rec"][0]


def test_extra_terms_and_after_step_extend_the_same_loop():
    calls = []

    def after(step, x, x_rec):
        assert not x_rec.requires_grad
        calls.append(step)
        return {"disc": float(step)}

    log = train_first_stage(kl_model(), batches(blobs(16), batch_size=8), steps=4, bf16=True,
                            extra_terms={"edge": (0.1, lambda x, x_rec: (x_rec - x).abs().amax())},
                            after_step=after)
    assert set(log.terms) == {"rec", "kl", "edge", "loss", "disc"} and calls == [0, 1, 2, 3]
    recomputed = [r + 1e-6 * k + 0.1 * e for r, k, e in zip(log.terms["rec"], log.terms["kl"], log.terms["edge"])]
    assert log.terms["loss"] == pytest.approx(recomputed, rel=1e-5)


def test_max_seconds_stops_early():
    log = train_first_stage(kl_model(), batches(blobs(16), batch_size=8), steps=10_000, max_seconds=0.0)
    assert len(log.terms["loss"]) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(reconstruction="l3"), "reconstruction must be 'l1' or 'l2'"),
    (dict(kl_weight=-1.0), "kl_weight must be >= 0"),
])
def test_loss_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FirstStageLoss(**kwargs)


# -----------------------------------------------------------------------------
# lesson 06: perceptual and patch-adversarial terms in the same loop


def tiny_disc(in_ch=1):
    torch.manual_seed(1)
    return PatchDiscriminator(PatchDiscriminatorConfig(in_ch=in_ch, ndf=4, n_layers=1))


def rgb_blobs(n=16):
    return blobs(n * 3).view(n, 3, 8, 8)


def test_disc_start_turns_the_gan_term_on_at_the_right_step():
    config = FirstStageLoss(disc_weight=0.5, disc_start=3,
                            discriminator=PatchDiscriminatorConfig(in_ch=1, ndf=4, n_layers=1))
    D = tiny_disc()
    before = [p.detach().clone() for p in D.parameters()]
    snapshots = []
    log = train_first_stage(kl_model(), batches(blobs(32), batch_size=8), steps=5, config=config, discriminator=D,
                            generator=torch.Generator().manual_seed(0),
                            after_step=lambda s, x, r: snapshots.append([p.detach().clone() for p in D.parameters()]))
    for k in ("g_adv", "lambda", "d_loss", "logits_real", "logits_fake"):
        assert log.terms[k][:3] == [0.0, 0.0, 0.0] and all(v != 0.0 for v in log.terms[k][3:]), k
    unchanged = [all(torch.equal(a, b) for a, b in zip(before, snap)) for snap in snapshots]
    assert unchanged == [True, True, True, False, False]  # D trains from step 3 on
    recomputed = [r + 1e-6 * k + 0.5 * lam * g for r, k, lam, g in
                  zip(log.terms["rec"], log.terms["kl"], log.terms["lambda"], log.terms["g_adv"])]
    assert log.terms["loss"] == pytest.approx(recomputed, rel=1e-5)


def test_logged_lambda_is_the_gradient_ratio_at_the_decoders_last_layer():
    """Step 0 with disc_start=0: recompute lambda by hand from the same initial weights and sample."""
    config = FirstStageLoss(disc_weight=1.0, discriminator=PatchDiscriminatorConfig(in_ch=1, ndf=4, n_layers=1))
    x = blobs(8)
    model, D = kl_model(), tiny_disc()
    terms, x_rec, _ = first_stage_terms(model, x, config, torch.Generator().manual_seed(0))
    W = model.decoder.conv_out.weight
    g_rec, = torch.autograd.grad(terms["rec"], W, retain_graph=True)
    g_gan, = torch.autograd.grad(generator_loss(D(x_rec)), W)
    hand = (g_rec.norm() / (g_gan.norm() + 1e-4)).item()
    log = train_first_stage(kl_model(), iter([(x,)]), steps=1, config=config, discriminator=tiny_disc(),
                            generator=torch.Generator().manual_seed(0))
    assert log.terms["lambda"][0] == pytest.approx(hand, rel=1e-4)


def test_perceptual_term_and_learned_logvar():
    torch.manual_seed(0)
    perceptual = PerceptualDistance(PerceptualNet())
    config = FirstStageLoss(perceptual_weight=0.5, learn_logvar=True, logvar_init=0.2)
    model = AutoencoderKL(AutoencoderConfig(in_ch=3, ch=8, ch_mult=(1, 2), z_ch=2, groups=4, attn_mid=False))
    log = train_first_stage(model, batches(rgb_blobs(), batch_size=8), steps=3, config=config, perceptual=perceptual,
                            lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert set(log.terms) == {"rec", "kl", "perceptual", "logvar", "loss"}
    s = 0.2  # the loss of step 0 is computed before the first update of s
    r, p, k = log.terms["rec"][0], log.terms["perceptual"][0], log.terms["kl"][0]
    assert log.terms["loss"][0] == pytest.approx((r + 0.5 * p) / math.exp(s) + s + 1e-6 * k, rel=1e-5)
    assert log.terms["logvar"][0] != 0.2  # s is learned


def test_full_objective_trains_a_vq_autoencoder_too():
    torch.manual_seed(0)
    model = VQAutoencoder(VQAutoencoderConfig(in_ch=3, ch=8, ch_mult=(1, 2), z_ch=2, groups=4, attn_mid=False,
                                              quantizer=QuantizerConfig(num_codes=8, dim=2)))
    config = FirstStageLoss(perceptual_weight=1.0, disc_weight=0.5, disc_start=1, gan_loss="non_saturating",
                            discriminator=PatchDiscriminatorConfig(in_ch=3, ndf=4, n_layers=1))
    log = train_first_stage(model, batches(rgb_blobs(), batch_size=8), steps=3, config=config, bf16=True,
                            perceptual=PerceptualDistance(PerceptualNet()), discriminator=tiny_disc(3))
    assert {"rec", "vq", "perceptual", "g_adv", "lambda", "d_loss", "perplexity"} <= set(log.terms)
    assert log.terms["lambda"][0] == 0.0 and log.terms["lambda"][2] > 0


def test_missing_networks_are_named():
    with pytest.raises(ValueError, match="needs a discriminator"):
        train_first_stage(kl_model(), batches(blobs(8), batch_size=8), 1, FirstStageLoss(disc_weight=0.1))
    with pytest.raises(ValueError, match="needs a perceptual distance"):
        train_first_stage(kl_model(), batches(blobs(8), batch_size=8), 1, FirstStageLoss(perceptual_weight=0.1))


def test_loss_config_round_trips_through_a_dict():
    config = FirstStageLoss(perceptual_weight=1.0, disc_weight=0.5, disc_start=10, gan_loss="non_saturating",
                            discriminator=PatchDiscriminatorConfig(ndf=16, n_layers=2))
    assert FirstStageLoss(**asdict(config)) == config  # a checkpoint's meta rebuilds the same config
    with pytest.raises(ValueError, match="gan_loss must be"):
        FirstStageLoss(gan_loss="wgan")
