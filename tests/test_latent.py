"""Latent diffusion as a composition: the latent cache, sampling through it, checkpoints."""

import pytest
import torch

import minildm.latent as latent
from helpers import perturb_
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
from minildm.latent import (LatentDiffusion, cached, cached_latents, encode_dataset, load_ldm, null_condition,
                            save_ldm)
from minildm.sampling import sample_ddim, sample_ddpm, sample_heun
from minildm.schedules import cosine_schedule
from minildm.text import TextConditionedUNet, TextEncoder, TextEncoderConfig, Tokenizer
from minildm.unet import UNet, UNetConfig


def _ae():
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(in_ch=1, ch=8, ch_mult=(1, 1), num_res_blocks=1, z_ch=2, groups=4,
                                         attn_mid=False))
    ae.scale_factor.fill_(0.7)
    return perturb_(ae, 0.02).eval()


def _unet(**changes):
    torch.manual_seed(1)
    cfg = dict(in_ch=2, out_ch=2, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), heads=2,
               groups=4, image_size=8)
    return perturb_(UNet(UNetConfig(**{**cfg, **changes})), 0.05).eval()


def test_encode_dataset_is_the_scaled_posterior_sample_batch_by_batch():
    ae, x = _ae(), torch.rand(10, 1, 16, 16) * 2 - 1
    z = encode_dataset(ae, x, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert z.shape == (10, 2, 8, 8)
    with torch.no_grad():
        post = ae.encode(x)
        ref = 0.7 * post.sample(torch.Generator().manual_seed(0))  # same draws: one generator in order
    torch.testing.assert_close(z, ref)


def test_latent_cache_round_trips_and_is_keyed_by_model_and_data(tmp_path, monkeypatch):
    ae, x = _ae(), torch.rand(6, 1, 16, 16) * 2 - 1
    path = tmp_path / "z.pt"
    z1 = cached_latents(ae, x, path, seed=3)
    assert path.is_file()
    torch.testing.assert_close(z1, encode_dataset(ae, x, generator=torch.Generator().manual_seed(3)))

    def fail(*args, **kwargs):
        raise AssertionError("should have read the cache")

    monkeypatch.setattr(latent, "encode_dataset", fail)
    assert torch.equal(cached_latents(ae, x, path, seed=3), z1)  # read back bit for bit
    monkeypatch.undo()
    x2 = x.clone()
    x2[0, 0, 0, 0] += 0.5  # one pixel changed: the cache is stale and is rebuilt
    z2 = cached_latents(ae, x2, path, seed=3)
    assert not torch.equal(z2[0], z1[0]) and torch.equal(z2[1:], z1[1:])
    ae.scale_factor.fill_(1.4)  # a new scale factor (a different model): rebuilt too
    torch.testing.assert_close(cached_latents(ae, x2, path, seed=3), 2 * z2)


def test_cache_survives_a_damaged_file_and_other_ranks_only_read(tmp_path):
    path, calls = tmp_path / "c.pt", []

    def compute():
        calls.append(1)
        return {"a": torch.arange(3)}

    assert cached(path, "k", compute, write=False)["a"].sum() == 3 and not path.exists()  # rank > 0 only reads
    cached(path, "k", compute)
    assert torch.equal(cached(path, "k", compute)["a"], torch.arange(3)) and len(calls) == 2  # read back
    path.write_bytes(path.read_bytes()[:20])  # truncated: recomputed and rewritten, not a crash
    assert torch.equal(cached(path, "k", compute)["a"], torch.arange(3)) and len(calls) == 3
    assert torch.equal(cached(path, "k", compute)["a"], torch.arange(3)) and len(calls) == 3
    cached(path, "other key", compute)
    assert len(calls) == 4


def test_decode_inverts_the_scale_factor():
    ae = _ae()
    ldm = LatentDiffusion(ae, _unet(), cosine_schedule(50))
    z = torch.randn(2, 2, 8, 8) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(ldm.decode(z), ae.decode(z / 0.7).clamp(-1, 1))
    assert ldm.f == 2 and ldm.latent_shape(16) == (2, 8, 8)
    assert not any(p.requires_grad for p in ae.parameters())  # frozen first stage


@pytest.mark.parametrize("sampler,steps", [(sample_ddim, 5), (sample_heun, 3), (sample_ddpm, None)])
def test_sample_is_the_sampler_on_the_guided_closure_then_decode(sampler, steps):
    ae = _ae()
    ldm = LatentDiffusion(ae, _unet(num_classes=3), cosine_schedule(20), prediction="v")
    labels = torch.tensor([0, 2, 1])
    x = ldm.sample(labels, image_size=16, guidance_scale=2.0, sampler=sampler, steps=steps,
                   generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and x.abs().max() <= 1
    # by hand: the same noise, the guided closure, the sampler, the decoder
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 8, 8, generator=g)

    def model(zt, t):
        u, c = ldm.denoiser(zt, t, torch.full((3,), 3)), ldm.denoiser(zt, t, labels)
        return u + 2.0 * (c - u)

    kw = {} if steps is None else {"steps": steps}
    z0 = sampler(model, z, ldm.schedule, prediction="v", generator=g, **kw)
    torch.testing.assert_close(x, ae.decode(z0 / 0.7).clamp(-1, 1), atol=1e-5, rtol=1e-4)


def test_conditional_samples_change_with_the_condition():
    ldm = LatentDiffusion(None, _unet(in_ch=1, out_ch=1, num_classes=3), cosine_schedule(20))
    a = ldm.sample(torch.tensor([0, 0]), image_size=8, steps=4, generator=torch.Generator().manual_seed(0))
    b = ldm.sample(torch.tensor([0, 1]), image_size=8, steps=4, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 1, 8, 8)  # pixel space: no first stage, f = 1
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1], atol=1e-4)


def test_null_condition():
    assert null_condition(_unet()) is None
    assert null_condition(_unet(num_classes=7)).item() == 7
    text = TextConditionedUNet(_unet(context_dim=16), TextEncoder(TextEncoderConfig(dim=16, heads=2)))
    assert torch.equal(null_condition(text), Tokenizer().null_ids())
    with pytest.raises(ValueError, match="unconditional"):
        LatentDiffusion(None, _unet(), cosine_schedule(20)).sample(torch.tensor([0]), image_size=8)
    with pytest.raises(ValueError, match="pass cond"):
        LatentDiffusion(None, _unet(), cosine_schedule(20)).sample(image_size=8)


def test_checkpoint_round_trip(tmp_path):
    ae = _ae()
    save_autoencoder(ae, tmp_path / "ae.pt")
    text = perturb_(TextConditionedUNet(_unet(context_dim=16), TextEncoder(TextEncoderConfig(dim=16, heads=2))), 0.05)
    ldm = LatentDiffusion(ae, text.eval(), cosine_schedule(30), prediction="eps")
    save_ldm(ldm, tmp_path / "ldm.pt", "ae.pt", steps=12, scale_factor=0.7)
    loaded, meta = load_ldm(tmp_path / "ldm.pt")
    assert meta == {"steps": 12, "scale_factor": 0.7} and loaded.prediction == "eps"
    assert torch.equal(loaded.schedule.betas, ldm.schedule.betas)
    assert float(loaded.first_stage.scale_factor) == pytest.approx(0.7)
    # the weights are stored in float16: compare with the float16-rounded original
    with torch.no_grad():
        for p in text.parameters():
            p.copy_(p.half().float())
    ids, _ = Tokenizer()(["a big blue circle at the bottom right"])
    kw = dict(image_size=16, steps=3, guidance_scale=3.0)
    torch.testing.assert_close(loaded.sample(ids, generator=torch.Generator().manual_seed(0), **kw),
                               ldm.sample(ids, generator=torch.Generator().manual_seed(0), **kw))
    torch.save(torch.load(tmp_path / "ldm.pt", weights_only=True), tmp_path / "check.pt")  # weights_only
    (tmp_path / "ae.pt").unlink()
    with pytest.raises(FileNotFoundError, match="needs its first stage"):
        load_ldm(tmp_path / "ldm.pt")
