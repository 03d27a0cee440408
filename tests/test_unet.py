"""The UNet: shapes for every use in the course, conditioning, batch independence, config checks."""

import pytest
import torch

from minildm.nn import count_params
from minildm.unet import UNet, UNetConfig, unet_summary
from helpers import perturb_


# (config, input shape): every place the course uses a UNet, at small widths
CONFIGS = {
    "digits28": (UNetConfig(in_ch=1, out_ch=1, ch=16, ch_mult=(1, 2, 2), attn_resolutions=(7,),
                            groups=4, image_size=28), (2, 1, 28, 28)),
    "digits32": (UNetConfig(in_ch=1, out_ch=1, ch=16, ch_mult=(1, 2, 2), attn_resolutions=(8,),
                            groups=4, image_size=32), (2, 1, 32, 32)),
    "rgb32": (UNetConfig(ch=16, ch_mult=(1, 2, 4), attn_resolutions=(16, 8), groups=4,
                         num_res_blocks=1), (2, 3, 32, 32)),
    "rgb64": (UNetConfig(ch=8, ch_mult=(1, 2, 2, 4), attn_resolutions=(8,), groups=4, heads=2,
                         num_res_blocks=1, image_size=64), (2, 3, 64, 64)),
    "latent8": (UNetConfig(in_ch=4, out_ch=4, ch=16, ch_mult=(1, 2), attn_resolutions=(8, 4),
                           groups=4, image_size=8), (2, 4, 8, 8)),
    "odd4levels": (UNetConfig(in_ch=1, out_ch=1, ch=8, ch_mult=(1, 1, 2, 2), attn_resolutions=(4,),
                              groups=4, heads=2, num_res_blocks=1, image_size=28), (2, 1, 28, 28)),
}


def perturbed(cfg: UNetConfig) -> UNet:
    """A UNet whose zero-initialised layers are made non-zero, in eval mode."""
    torch.manual_seed(0)
    return perturb_(UNet(cfg), std=0.05).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes(name):
    cfg, shape = CONFIGS[name]
    out = perturbed(cfg)(torch.randn(shape), torch.rand(shape[0]) * 1000)
    assert out.shape == (shape[0], cfg.out_ch) + shape[2:]
    assert torch.isfinite(out).all()


def test_shapes_with_class_and_context():
    cfg, shape = CONFIGS["digits28"]
    x, t = torch.randn(shape), torch.tensor([3.0, 500.0])
    classy = perturbed(UNetConfig(**{**vars(cfg), "num_classes": 10}))
    assert classy(x, t, torch.tensor([0, 9])).shape == shape
    texty = perturbed(UNetConfig(**{**vars(cfg), "context_dim": 12}))
    ctx, mask = torch.randn(2, 5, 12), torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert texty(x, t, ctx, mask).shape == shape
    assert texty(x, t, ctx).shape == shape


def test_output_is_exactly_zero_at_init():
    """conv_out is zero-initialised, so a fresh UNet predicts eps = 0 for any input."""
    cfg, shape = CONFIGS["rgb32"]
    out = UNet(cfg)(torch.randn(shape), torch.tensor([1.0, 700.0]))
    assert torch.count_nonzero(out) == 0


def test_batch_independence():
    """GroupNorm and attention act per sample: sample i's output ignores the rest of the batch."""
    cfg, shape = CONFIGS["digits28"]
    model = perturbed(UNetConfig(**{**vars(cfg), "context_dim": 6}))
    x, t, ctx = torch.randn(4, *shape[1:]), torch.rand(4) * 1000, torch.randn(4, 3, 6)
    mask = torch.tensor([[True, False, True]] * 4)
    full = model(x, t, ctx, mask)
    for i in range(4):
        torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], mask[i:i + 1]),
                                   full[i:i + 1], rtol=1e-4, atol=1e-5)
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:])  # change the other samples
    torch.testing.assert_close(model(x2, t, ctx, mask)[0], full[0], rtol=1e-4, atol=1e-5)


def test_class_label_changes_output_and_none_is_null_class():
    cfg, shape = CONFIGS["digits28"]
    model = perturbed(UNetConfig(**{**vars(cfg), "num_classes": 10}))
    x, t = torch.randn(1, *shape[1:]).expand(3, -1, -1, -1), torch.full((3,), 100.0)
    out = model(x, t, torch.tensor([0, 7, 10]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert not torch.allclose(out[0], out[2], atol=1e-4)
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), 10)))  # None = null


def test_context_masking_and_unconditional():
    cfg, shape = CONFIGS["latent8"]
    model = perturbed(UNetConfig(**{**vars(cfg), "context_dim": 6}))
    x, t = torch.randn(shape), torch.tensor([10.0, 900.0])
    ctx = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    ctx2 = ctx.clone()
    ctx2[~mask] = torch.randn(int((~mask).sum()), 6) * 10  # change only the padding tokens
    out = model(x, t, ctx, mask)
    torch.testing.assert_close(model(x, t, ctx2, mask), out)
    assert not torch.allclose(model(x, t, ctx2), model(x, t, ctx), atol=1e-4)  # unmasked: they matter
    # no context == every token masked: the unconditional model of classifier-free guidance
    torch.testing.assert_close(model(x, t), model(x, t, ctx, torch.zeros(2, 4, dtype=torch.bool)))
    assert not torch.allclose(model(x, t), out, atol=1e-4)


def test_scalar_time_and_channels_last():
    cfg, shape = CONFIGS["digits32"]
    model = perturbed(cfg)
    x = torch.randn(shape)
    ref = model(x, torch.full((2,), 250.0))
    torch.testing.assert_close(model(x, torch.tensor(250.0)), ref)
    cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last), torch.tensor(250.0)),
                               ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_and_bf16_weights_are_close_to_fp32():
    cfg, shape = CONFIGS["rgb32"]
    model = perturbed(cfg)
    x, t = torch.randn(shape), torch.tensor([5.0, 600.0])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t)
        pure = model.to(torch.bfloat16)(x.bfloat16(), t)
    assert auto.dtype == pure.dtype == torch.bfloat16
    for out in (auto, pure):
        assert ((out.float() - ref).norm() / ref.norm()).item() < 3e-2


def test_cond_misuse_raises():
    cfg, shape = CONFIGS["latent8"]
    x, t = torch.randn(shape), torch.zeros(2)
    with pytest.raises(ValueError, match="neither"):
        UNet(cfg)(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="context_mask"):
        UNet(UNetConfig(**{**vars(cfg), "context_dim": 6}))(x, t, None, torch.ones(2, 3, dtype=torch.bool))


def test_summary_and_param_count():
    cfg, shape = CONFIGS["digits28"]
    model = UNet(cfg)
    table = unet_summary(model, shape)
    assert "down_blocks.2.1" in table and "(2, 32, 7, 7)" in table  # 16 * 2 channels at 7x7
    assert "up_blocks.0.0" in table and "(2, 64, 7, 7)" in table  # concatenated skip 32 + 32
    assert f"total parameters: {count_params(model):,}" in table
    assert len(model._forward_hooks) == 0 and all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("changes, match", [
    (dict(groups=5), "groups"),
    (dict(attn_resolutions=(9,)), "attn_resolutions"),
    (dict(heads=3), "heads"),
    (dict(num_classes=10, context_dim=8), "not both"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(num_classes=0), "num_classes"),
])
def test_config_validation(changes, match):
    base = dict(ch=16, ch_mult=(1, 2, 2), attn_resolutions=(8,), heads=4, groups=4, image_size=32)
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**base, **changes})


def test_resolutions():
    assert UNetConfig(ch_mult=(1, 2, 2), attn_resolutions=(7,), image_size=28).resolutions == (28, 14, 7)
    assert UNetConfig(ch_mult=(1, 1, 2, 2), attn_resolutions=(), image_size=28).resolutions == (28, 14, 7, 4)
