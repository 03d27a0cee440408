"""Building blocks of minildm.nn, each checked against an independent reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from minildm.nn import (CrossAttention2d, Downsample, ResBlock, SelfAttention2d, Upsample, attention,
                        count_params, normalization, timestep_embedding, zero_module)
from helpers import perturb_


def naive_attention(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d)) V, written out; q (B, nh, Lq, d), k/v (B, nh, Lk, d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, nh, Lq, d)


# --- timestep embedding -------------------------------------------------------------------


def test_timestep_embedding_matches_hand_formula():
    t = torch.tensor([0.0, 1.0, 2.5, 999.0])
    dim, half = 8, 4
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim)
    for b in range(4):
        for i in range(half):
            w = 10000.0 ** (-i / half)
            assert emb[b, i].item() == pytest.approx(math.cos(t[b].item() * w), abs=1e-5)
            assert emb[b, half + i].item() == pytest.approx(math.sin(t[b].item() * w), abs=1e-5)


def test_timestep_embedding_odd_dim_and_fractional_t():
    t = torch.tensor([0.25, 0.75])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (2, 7)
    assert torch.all(emb[:, -1] == 0)
    assert not torch.allclose(emb[0], emb[1])  # fractional times are distinguished


def test_timestep_embedding_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 3.0, 17.5, 500.0, 999.0])
    ref = embeddings.get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 32), ref)


# --- ResBlock -----------------------------------------------------------------------------


def test_resblock_is_identity_at_init_and_shapes():
    x = torch.randn(2, 16, 9, 9)
    block = ResBlock(16, 16, emb_dim=12, groups=4)
    torch.testing.assert_close(block(x, torch.randn(2, 12)), x)  # zero last conv
    wider = ResBlock(16, 32, emb_dim=None, groups=4)  # autoencoder-style: no embedding
    assert wider(x).shape == (2, 32, 9, 9)
    torch.testing.assert_close(wider(x), wider.skip(x))


def test_resblock_matches_hand_computation():
    block = perturb_(ResBlock(8, 12, emb_dim=5, groups=4), std=0.1).eval()
    x, emb = torch.randn(3, 8, 6, 6), torch.randn(3, 5)
    h = F.conv2d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias)),
                 block.conv1.weight, block.conv1.bias, padding=1)
    h = h + (F.silu(emb) @ block.emb_proj.weight.T + block.emb_proj.bias)[:, :, None, None]
    h = F.conv2d(F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias)),
                 block.conv2.weight, block.conv2.bias, padding=1)
    ref = F.conv2d(x, block.skip.weight, block.skip.bias) + h
    torch.testing.assert_close(block(x, emb), ref)


def test_resblock_needs_embedding_when_built_with_one():
    with pytest.raises(ValueError):
        ResBlock(8, 8, emb_dim=4, groups=4)(torch.randn(1, 8, 4, 4))


# --- attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 4])
def test_self_attention_matches_naive(heads):
    block = perturb_(SelfAttention2d(16, heads=heads, groups=4), std=0.1)
    x = torch.randn(2, 16, 5, 7)
    B, C, H, W = x.shape
    h = F.group_norm(x, 4, block.norm.weight, block.norm.bias).reshape(B, C, H * W).transpose(1, 2)
    q, k, v = (h @ block.qkv.weight.T + block.qkv.bias).split(C, dim=-1)
    split = lambda z: z.reshape(B, H * W, heads, C // heads).permute(0, 2, 1, 3)
    o = naive_attention(split(q), split(k), split(v)).permute(0, 2, 1, 3).reshape(B, H * W, C)
    o = o @ block.proj.weight.T + block.proj.bias  # (B, HW, C)
    ref = x + o.transpose(1, 2).reshape(B, C, H, W)
    torch.testing.assert_close(block(x), ref)
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), ref)


@pytest.mark.parametrize("heads", [1, 2])
def test_cross_attention_matches_naive_with_mask(heads):
    block = perturb_(CrossAttention2d(8, context_dim=6, heads=heads, groups=2), std=0.1)
    x, c = torch.randn(2, 8, 3, 4), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    B, C, H, W = x.shape
    q = F.group_norm(x, 2, block.norm.weight, block.norm.bias).reshape(B, C, H * W).transpose(1, 2)
    q = q @ block.q.weight.T + block.q.bias
    k, v = (c @ block.kv.weight.T + block.kv.bias).split(C, dim=-1)
    split = lambda z: z.reshape(B, -1, heads, C // heads).permute(0, 2, 1, 3)
    o = naive_attention(split(q), split(k), split(v), mask).permute(0, 2, 1, 3).reshape(B, H * W, C)
    o = o @ block.proj.weight.T + block.proj.bias
    ref = x + o.transpose(1, 2).reshape(B, C, H, W)
    torch.testing.assert_close(block(x, c, mask), ref)


def test_cross_attention_ignores_masked_tokens():
    block = perturb_(CrossAttention2d(8, context_dim=6, heads=2, groups=2), std=0.1)
    x, c = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, False, True]])
    c2 = c.clone()
    c2[~mask] = 100.0 * torch.randn(int((~mask).sum()), 6)  # change only the padding
    torch.testing.assert_close(block(x, c, mask), block(x, c2, mask))
    assert not torch.allclose(block(x, c), block(x, c2))  # without the mask they matter


def test_cross_attention_all_masked_is_identity():
    block = perturb_(CrossAttention2d(8, context_dim=6, heads=2, groups=2), std=0.1)
    x, c = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 6)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    out = block(x, c, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], x[0])  # no tokens: no update
    assert not torch.allclose(out[1], x[1])


def test_attention_runs_in_float32_under_autocast():
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = naive_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_groupnorm_in_float32_keeps_dtype():
    gn = perturb_(normalization(8, 4), std=0.1)
    x = torch.randn(2, 8, 5, 5)
    ref = F.group_norm(x, 4, gn.weight, gn.bias, 1e-5)
    torch.testing.assert_close(gn(x), ref)
    out = gn(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.group_norm(x.bfloat16().float(), 4, gn.weight, gn.bias, 1e-5),
                               rtol=1e-2, atol=1e-2)


def test_attention_is_identity_at_init():
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(SelfAttention2d(8, 2, 2)(x), x)
    assert torch.equal(CrossAttention2d(8, 3, 2, 2)(x, torch.randn(2, 5, 3)), x)


def test_attention_heads_must_divide_channels():
    with pytest.raises(ValueError):
        SelfAttention2d(12, heads=5, groups=4)
    with pytest.raises(ValueError):
        CrossAttention2d(12, 4, heads=5, groups=4)


# --- resampling and helpers ---------------------------------------------------------------


def test_down_and_up_sample_shapes():
    x = torch.randn(2, 4, 7, 7)
    assert Downsample(4)(x).shape == (2, 4, 4, 4)  # ceil(7 / 2)
    assert Upsample(4)(x).shape == (2, 4, 14, 14)
    assert Upsample(4)(torch.randn(2, 4, 4, 4), size=(7, 7)).shape == (2, 4, 7, 7)


def test_upsample_is_nearest_then_conv():
    up = Upsample(3)
    x = torch.randn(1, 3, 2, 2)
    ref = F.conv2d(x.repeat_interleave(2, 2).repeat_interleave(2, 3), up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(up(x), ref)


def test_helpers():
    lin = zero_module(torch.nn.Linear(3, 4))
    assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
    assert count_params(lin) == 16
    gn = normalization(8, 4)
    assert gn.num_groups == 4 and gn.num_channels == 8
