"""The first-stage training loop: it lowers the loss on a tiny problem, logs every term,
weighs the terms as documented, and takes extra terms without a second loop."""

import pytest
import torch
import torch.nn.functional as F

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, VQAutoencoder, VQAutoencoderConfig
from minildm.data import batches
from minildm.firststage import FirstStageLoss, first_stage_terms, total_loss, train_first_stage
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
