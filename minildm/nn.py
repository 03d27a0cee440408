"""Building blocks shared by the UNet and the autoencoders.

Everything here is a plain nn.Module or function on image-shaped tensors (B, C, H, W).
The same argument names are used everywhere:

    in_ch, out_ch  channels in and out of a block
    ch             channels of a block that keeps its width (attention, resampling)
    groups         number of GroupNorm groups (every channel count must be divisible by it)
    dropout        dropout probability inside a ResBlock
    emb_dim        width of the embedding vector (time, class) a ResBlock is conditioned on

The residual blocks follow Ho et al. (2020, "Denoising Diffusion Probabilistic Models",
Appendix B) as refined by Dhariwal & Nichol (2021, "Diffusion Models Beat GANs", ADM);
the cross-attention follows Rombach et al. (2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3.3, Eq. 3).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t, shape (B,) -> (B, dim).

    The positional encoding of Vaswani et al. (2017, Sec. 3.5), used for the diffusion
    time t by Ho et al. (2020, Appendix B). With half = dim // 2 and frequencies
    w_i = max_period ** (-i / half), i = 0 .. half-1:

        emb[:, i]        = cos(t * w_i)
        emb[:, half + i] = sin(t * w_i)

    (cosines first, like ADM and diffusers' UNet2DModel). An odd dim gets a zero last column.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / half)  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, 2 * half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it.

    Used on the last layer of each residual branch so that a freshly built block is the
    identity (ADM, Dhariwal & Nichol 2021; "Fixup"-style initialisation).
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (ADM's GroupNorm32).

    ADM normalises in float32 for stable mixed-precision training. Under CPU bf16 autocast
    PyTorch would otherwise run GroupNorm in bf16, and its channels_last bf16 backward is
    several times slower than the float32 one (BENCHMARKS.md); the price is two casts.
    """

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()  # no-ops unless the model is in bf16/fp16
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def normalization(ch: int, groups: int) -> nn.GroupNorm:
    """GroupNorm over `ch` channels in `groups` groups (Wu & He 2018), as in DDPM/ADM.

    GroupNorm normalises each sample on its own, so a sample's output never depends on
    the rest of the batch (unlike BatchNorm).
    """
    return GroupNorm32(groups, ch, eps=1e-5)


def count_params(module: nn.Module) -> int:
    """Number of parameters of `module`."""
    return sum(p.numel() for p in module.parameters())


class ResBlock(nn.Module):
    """Residual block: x + conv(SiLU(GN(conv(SiLU(GN(x))) + proj(emb)))).

    DDPM's residual block (Ho et al. 2020, Appendix B) in ADM's form: the embedding (time,
    or time + class) is projected to out_ch and added after the first conv; the last conv
    is zero-initialised so the block starts as the identity (or as the 1x1 skip when the
    channel count changes). emb_dim=None builds a block without an embedding (autoencoders).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None,
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = normalization(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch) if emb_dim is not None else None
        self.norm2 = normalization(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # x: (B, in_ch, H, W), emb: (B, emb_dim) or None
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with emb_dim; pass an embedding")
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, out_ch, H, W)
        return self.skip(x) + h


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, C) -> (B, heads, L, C // heads)."""
    B, L, C = x.shape
    return x.view(B, L, heads, C // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    B, heads, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, heads * d)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, Eq. 1), computed in float32.

    q (B, nh, Lq, d), k and v (B, nh, Lk, d), mask broadcastable to (B, nh, Lq, Lk), True =
    attend. Runs F.scaled_dot_product_attention (a fused kernel that never stores the
    Lq x Lk matrix) with autocast off, so the softmax is in float32 as in ADM's attention;
    on CPU the float32 kernel is also faster than the bf16 one (see BENCHMARKS.md).
    """
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.to(q.dtype)  # (B, nh, Lq, d)


def _tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, HW, C): one token per pixel (a free view if x is channels_last)."""
    return x.flatten(2).transpose(1, 2)


def _image(h: Tensor, H: int, W: int) -> Tensor:
    """(B, HW, C) -> (B, C, H, W), the inverse of _tokens."""
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], H, W)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, residual.

    softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, Eq. 1) with Q, K, V linear maps of
    GN(x); every pixel attends to every pixel. As in DDPM/ADM at low resolutions. The output
    projection is zero-initialised, so the block starts as the identity.
    """

    def __init__(self, ch: int, heads: int = 1, groups: int = 32):
        super().__init__()
        if ch % heads != 0:
            raise ValueError(f"ch={ch} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = normalization(ch, groups)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_module(nn.Linear(ch, ch))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(_tokens(self.norm(x))).chunk(3, dim=-1)  # 3 x (B, HW, C)
        q, k, v = (_split_heads(z, self.heads) for z in (q, k, v))  # (B, nh, HW, d)
        h = self.proj(_merge_heads(attention(q, k, v)))  # (B, HW, C)
        return x + _image(h, H, W)  # (B, C, H, W)


class CrossAttention2d(nn.Module):
    """Multi-head cross-attention from a feature map to a token sequence, residual.

    Latent diffusion's conditioning mechanism (Rombach et al. 2022, Eq. 3):
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = W_Q GN(x) from the pixels and
    K = W_K c, V = W_V c from the context c of shape (B, L, context_dim).

    mask (B, L) bool marks the real tokens (True) among padding (False); padded tokens get
    no attention weight. A sample whose tokens are all masked gets no update at all (its
    output is exactly x): that is the "unconditional" input of classifier-free guidance.
    The output projection is zero-initialised, so the block starts as the identity.
    """

    def __init__(self, ch: int, context_dim: int, heads: int = 1, groups: int = 32):
        super().__init__()
        if ch % heads != 0:
            raise ValueError(f"ch={ch} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = normalization(ch, groups)
        self.q = nn.Linear(ch, ch)
        self.kv = nn.Linear(context_dim, 2 * ch)
        self.proj = zero_module(nn.Linear(ch, ch))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        # x: (B, C, H, W), context: (B, L, context_dim), mask: (B, L) bool or None
        B, C, H, W = x.shape
        q = self.q(_tokens(self.norm(x)))  # (B, HW, C)
        k, v = self.kv(context).chunk(2, dim=-1)  # 2 x (B, L, C)
        q, k, v = (_split_heads(z, self.heads) for z in (q, k, v))  # (B, nh, *, d)
        attn_mask = None
        if mask is not None:
            has_tokens = mask.any(dim=1)  # (B,)
            # a fully masked row would give softmax over nothing (NaN): let it attend
            # everywhere, then drop its result below
            attn_mask = (mask | ~has_tokens[:, None])[:, None, None, :]  # (B, 1, 1, L)
        h = self.proj(_merge_heads(attention(q, k, v, attn_mask)))  # (B, HW, C)
        if mask is not None:
            h = h * has_tokens[:, None, None].to(h.dtype)  # no tokens -> no update
        return x + _image(h, H, W)  # (B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (DDPM/ADM). Odd n -> ceil(n / 2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour) then a 3x3 conv (DDPM/ADM).

    `size` overrides the output size: a UNet passes the size of the skip connection it
    will be concatenated with, which makes odd sizes work (7 -> 14 -> 28, or 4 -> 7).
    """

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        return self.conv(x)
