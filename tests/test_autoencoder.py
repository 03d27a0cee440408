"""The first-stage autoencoders: the Gaussian posterior against torch.distributions, shapes
for every downsampling factor, the measured scale factor, the VQ model, config checks."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pathlib import Path

from minildm.autoencoder import (AutoencoderConfig, AutoencoderKL, DiagonalGaussian,
                                 FlatAutoencoderKL, VQAutoencoder, VQAutoencoderConfig,
                                 load_autoencoder, measure_scale_factor, save_autoencoder)
from minildm.data import photo_crops
from minildm.metrics import psnr
from minildm.quantize import QuantizerConfig
from helpers import perturb_


def gaussian(B=3, C=2, H=4, W=5, seed=0, dtype=torch.float64) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(B, 2 * C, H, W, generator=g, dtype=dtype))


# -----------------------------------------------------------------------------
# DiagonalGaussian

def test_kl_matches_torch_distributions():
    q = gaussian()
    reference = kl_divergence(Normal(q.mean, q.std), Normal(0.0, 1.0)).flatten(1).sum(1)  # (B,)
    torch.testing.assert_close(q.kl(), reference)
    assert q.kl().shape == (3,)


def test_kl_is_zero_only_at_the_standard_normal():
    q = DiagonalGaussian(torch.zeros(2, 8, 3, 3))  # mean 0, logvar 0
    torch.testing.assert_close(q.kl(), torch.zeros(2))
    assert (gaussian().kl() > 0).all()


def test_nll_matches_torch_distributions():
    q = gaussian()
    z = q.sample(torch.Generator().manual_seed(1))
    reference = -Normal(q.mean, q.std).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(q.nll(z), reference)


def test_sample_moments():
    params = torch.cat([torch.full((1, 1, 1, 1), 1.5), torch.full((1, 1, 1, 1), 2 * torch.tensor(0.3).log())], 1)
    q = DiagonalGaussian(params.expand(200_000, 2, 1, 1))  # mean 1.5, std 0.3
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 1.5) < 4 * 0.3 / 200_000**0.5
    assert abs(z.std().item() - 0.3) < 0.002
    assert torch.equal(q.mode(), q.mean)


def test_sample_is_reproducible_and_differentiable():
    params = torch.randn(2, 4, 3, 3, requires_grad=True)
    q = DiagonalGaussian(params)
    z1 = q.sample(torch.Generator().manual_seed(0))
    z2 = q.sample(torch.Generator().manual_seed(0))
    assert torch.equal(z1, z2)
    z1.sum().backward()  # the reparameterisation trick: gradients reach mean and logvar
    assert params.grad.abs().sum(dim=(0, 2, 3)).gt(0).all()


def test_logvar_is_clamped_and_bf16_is_computed_in_float32():
    q = DiagonalGaussian(torch.tensor([0.0, 100.0]).view(1, 2, 1, 1).bfloat16())
    assert q.mean.dtype == torch.float32 and q.logvar.item() == 20.0
    assert torch.isfinite(q.kl()).all()


# -----------------------------------------------------------------------------
# encoder / decoder shapes

CH_MULT = {1: (1,), 2: (1, 2), 4: (1, 2, 2), 8: (1, 1, 2, 2), 16: (1, 1, 1, 2, 2)}


@pytest.mark.parametrize("in_ch", [1, 3])
@pytest.mark.parametrize("f", [1, 2, 4, 8, 16])
def test_shapes_for_every_downsampling_factor(f, in_ch):
    size = 64 if f == 16 else 32
    cfg = AutoencoderConfig(in_ch=in_ch, ch=8, ch_mult=CH_MULT[f], z_ch=3, groups=4, attn_mid=f >= 4)
    assert cfg.downsampling_factor == f
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(cfg), std=0.05).eval()
    x = torch.randn(2, in_ch, size, size)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 3, size // f, size // f) == (2, *cfg.latent_shape(size))
    x_rec, post = model(x)
    assert x_rec.shape == x.shape and torch.isfinite(x_rec).all()
    assert model.decode(posterior.mode()).shape == x.shape


def test_non_square_images_and_no_attention():
    cfg = AutoencoderConfig(in_ch=3, ch=8, ch_mult=(1, 2, 2), groups=4, attn_mid=False)
    model = AutoencoderKL(cfg)
    x_rec, posterior = model(torch.randn(1, 3, 16, 24))
    assert posterior.mean.shape == (1, 4, 4, 6) and x_rec.shape == (1, 3, 16, 24)


def test_encoder_rejects_a_size_f_does_not_divide():
    model = AutoencoderKL(AutoencoderConfig(in_ch=1, ch=8, ch_mult=(1, 2, 2, 2), groups=4))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor f=8"):
        model.encode(torch.randn(1, 1, 28, 28))


def test_bf16_autocast_forward():
    model = AutoencoderKL(AutoencoderConfig(in_ch=3, ch=8, ch_mult=(1, 2), groups=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_rec, posterior = model(torch.randn(2, 3, 8, 8))
    assert posterior.mean.dtype == torch.float32 and x_rec.shape == (2, 3, 8, 8)


# -----------------------------------------------------------------------------
# latent scale factor

def test_scale_factor_gives_unit_std_on_the_data_it_was_measured_on():
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(AutoencoderConfig(in_ch=1, ch=8, ch_mult=(1, 2), groups=4)), std=0.3)
    x = torch.randn(40, 1, 16, 16)
    scale = measure_scale_factor(model, x, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert model.scale_factor.item() == pytest.approx(scale)
    z = model.encode_latents(x, generator=torch.Generator().manual_seed(0))
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)
    z_raw = model.encode(x).sample(torch.Generator().manual_seed(0))
    assert z.std().item() / z_raw.std().item() == pytest.approx(scale, rel=1e-4)
    # decode_latents undoes the scaling
    torch.testing.assert_close(model.decode_latents(z), model.decode(z_raw))
    assert "scale_factor" in model.state_dict()


def test_save_and_load_keep_weights_and_scale_factor(tmp_path):
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(AutoencoderConfig(in_ch=1, ch=8, ch_mult=(1, 2), groups=4)), std=0.05).eval()
    model.scale_factor.fill_(0.25)
    save_autoencoder(model, tmp_path / "ae.pt", steps=7)
    loaded, meta = load_autoencoder(tmp_path / "ae.pt")
    assert meta == {"steps": 7} and loaded.scale_factor.item() == 0.25 and loaded.config == model.config
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x, sample=False)[0], model(x, sample=False)[0])
    save_autoencoder(model, tmp_path / "half.pt", half=True)
    half, _ = load_autoencoder(tmp_path / "half.pt")
    assert next(half.parameters()).dtype == torch.float32
    torch.testing.assert_close(half(x, sample=False)[0], model(x, sample=False)[0], atol=1e-2, rtol=1e-2)


# -----------------------------------------------------------------------------
# VQ autoencoder

def vq_model(**quantizer) -> VQAutoencoder:
    cfg = VQAutoencoderConfig(in_ch=3, ch=8, ch_mult=(1, 2, 2), z_ch=3, groups=4,
                              quantizer=QuantizerConfig(num_codes=32, dim=3, **quantizer))
    torch.manual_seed(0)
    return VQAutoencoder(cfg)


def test_vq_forward_shapes_and_loss():
    model = vq_model()
    x = torch.randn(2, 3, 16, 16)
    x_rec, q = model(x)
    assert x_rec.shape == x.shape
    assert q.z_q.shape == (2, 3, 4, 4) and q.indices.shape == (2, 4, 4)
    # the loss is codebook + beta * commitment = (1 + beta) * mean squared distance to the codes
    z_e = model.encode(x)
    codes = model.quantizer.lookup(q.indices)
    torch.testing.assert_close(q.loss, 1.25 * (z_e - codes).square().mean())
    torch.testing.assert_close(model.decode_indices(q.indices), x_rec)


def test_vq_latents_are_pre_quantization_and_decode_quantizes():
    model = vq_model().eval()
    x = torch.randn(2, 3, 16, 16)
    scale = measure_scale_factor(model, x)
    z = model.encode_latents(x)
    torch.testing.assert_close(z, scale * model.encode(x))
    torch.testing.assert_close(model.decode_latents(z), model(x)[0])


def test_vq_save_and_load(tmp_path):
    model = vq_model().eval()
    save_autoencoder(model, tmp_path / "vq.pt")
    loaded, _ = load_autoencoder(tmp_path / "vq.pt")
    assert isinstance(loaded, VQAutoencoder) and loaded.config == model.config
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])


# -----------------------------------------------------------------------------
# config validation

@pytest.mark.parametrize("kwargs, message", [
    (dict(ch_mult=()), "ch_mult must be a non-empty"),
    (dict(ch_mult=(1, 0)), "ch_mult must be a non-empty"),
    (dict(z_ch=0), "z_ch must be an int >= 1"),
    (dict(in_ch=2.5), "in_ch must be an int >= 1"),
    (dict(ch=12, groups=8), "groups=8 must divide every width"),
    (dict(ch=8, groups=8, ch_mult=(1, 2), heads=3), "heads=3 must divide the middle width 16"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig(**kwargs)


def test_vq_config_checks_the_code_length():
    with pytest.raises(ValueError, match="quantizer.dim=4 must equal z_ch=3"):
        VQAutoencoderConfig(z_ch=3)
    assert VQAutoencoderConfig(z_ch=3, quantizer=QuantizerConfig(dim=3)).quantizer.dim == 3


def test_latent_shape():
    cfg = AutoencoderConfig(ch_mult=(1, 2, 2, 4), z_ch=4)
    assert cfg.downsampling_factor == 8 and cfg.latent_shape(256) == (4, 32, 32)
    assert cfg.latent_shape(64, 128) == (4, 8, 16)
    with pytest.raises(ValueError, match="not divisible"):
        cfg.latent_shape(28)


def test_flat_autoencoder_has_a_1d_latent_of_the_same_size():
    cfg = AutoencoderConfig(in_ch=3, ch=8, ch_mult=(1, 2, 2), z_ch=4, groups=4)
    model = FlatAutoencoderKL(cfg, image_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 4 * 4 * 4, 1, 1)  # n = z_ch h w values, no spatial layout
    x_rec, _ = model(x)
    assert x_rec.shape == x.shape


def test_flat_autoencoder_reproduces_the_shipped_lesson_04_checkpoint():
    """The package class loads lesson 04's file strictly and gives the PSNR the build script stored."""
    ckpt = torch.load(Path(__file__).parents[1] / "data/checkpoints/ae_photos_f4_flat.pt", weights_only=True)
    model = FlatAutoencoderKL(AutoencoderConfig(**ckpt["config"]), ckpt["image_size"])
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    x = photo_crops(512, size=32, seed=1)
    with torch.no_grad():
        x_rec = model.eval()(x, sample=False)[0].clamp(-1, 1)
    assert abs(psnr(x_rec, x).mean().item() - ckpt["meta"]["psnr"]) < 1e-3
