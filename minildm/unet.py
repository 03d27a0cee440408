"""The denoising UNet eps_theta(x_t, t, cond) of DDPM and latent diffusion, in one file.

Layout of DDPM (Ho et al. 2020, Appendix B) as refined by ADM (Dhariwal & Nichol 2021):

    conv_in
    down:   per level, num_res_blocks x [ResBlock (+ attention)], then Downsample
            (except at the last level); every output is kept as a skip connection
    middle: ResBlock, attention, ResBlock
    up:     per level, (num_res_blocks + 1) x [concat(h, skip) -> ResBlock (+ attention)],
            then Upsample (except at the top level)
    GroupNorm, SiLU, conv_out (zero-initialised: the UNet outputs exactly 0 at init)

Conditioning (one forward signature, `unet(x, t, cond=None, context_mask=None)`):

    time t           sinusoidal embedding -> MLP -> emb (B, 4*ch), added in every ResBlock
    num_classes=K    cond = class labels (B,) in 0..K-1, or K: the "null" class of
                     classifier-free guidance (Ho & Salimans 2022); cond=None means all-null
    context_dim=D    cond = token sequence (B, L, D), read by cross-attention (Rombach et al.
                     2022, Sec. 3.3) after every self-attention; context_mask (B, L) bool marks
                     the real tokens. cond=None (or a sample with no real token) means no
                     cross-attention update: the unconditional model of classifier-free guidance.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minildm.nn import (CrossAttention2d, Downsample, ResBlock, SelfAttention2d, Upsample,
                        count_params, normalization, timestep_embedding, zero_module)


@dataclass
class UNetConfig:
    in_ch: int = 3  # channels of x_t: 1 grey digits, 3 RGB, 4 for SD-like latents
    out_ch: int = 3  # channels predicted (eps, x0 or v); usually = in_ch
    ch: int = 32  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 4)  # one entry per resolution level; len-1 downsamplings
    num_res_blocks: int = 2  # ResBlocks per level on the way down (the way up has one more)
    attn_resolutions: tuple[int, ...] = (8,)  # feature-map sizes that get self-attention
    heads: int = 4  # attention heads; must divide the channels where attention is used
    dropout: float = 0.0  # dropout in the ResBlocks; DDPM used 0.1 on CIFAR-10
    groups: int = 8  # GroupNorm groups; must divide ch * m for every m in ch_mult
    num_classes: int | None = None  # class-conditional: labels 0..num_classes-1, +1 "null"
    context_dim: int | None = None  # cross-attention to a (B, L, context_dim) token sequence
    image_size: int = 32  # side of the input; places attention, e.g. 28 -> 28, 14, 7

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        for name in ("in_ch", "out_ch", "ch", "num_res_blocks", "heads", "groups", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.ch_mult) == 0 or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        for w in widths:
            if w % self.groups != 0:
                raise ValueError(f"groups={self.groups} must divide every width {widths}; {w} is not")
        res = self.resolutions
        for r in self.attn_resolutions:
            if r not in res:
                raise ValueError(f"attn_resolutions has {r}, but the feature maps are {res} "
                                 f"for image_size={self.image_size} and {len(self.ch_mult)} levels")
        attn_widths = [self.ch * m for m, r in zip(self.ch_mult, res) if r in self.attn_resolutions]
        for w in attn_widths + [self.ch * self.ch_mult[-1]]:  # + the middle block
            if w % self.heads != 0:
                raise ValueError(f"heads={self.heads} must divide the width {w} of an attention block")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be None or >= 1, got {self.context_dim}")
        if self.num_classes is not None and self.context_dim is not None:
            raise ValueError("set num_classes or context_dim, not both: cond is one or the other")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side at each level: a stride-2 conv maps n to ceil(n / 2)."""
        return tuple(math.ceil(self.image_size / 2**i) for i in range(len(self.ch_mult)))


class UNetBlock(nn.Module):
    """One step of a level: ResBlock, then self-attention and cross-attention if enabled."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attn: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, 4 * cfg.ch, cfg.dropout, cfg.groups)
        self.attn = SelfAttention2d(out_ch, cfg.heads, cfg.groups) if attn else None
        self.cross = None
        if attn and cfg.context_dim is not None:
            self.cross = CrossAttention2d(out_ch, cfg.context_dim, cfg.heads, cfg.groups)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        x = self.res(x, emb)  # (B, out_ch, H, W)
        if self.attn is not None:
            x = self.attn(x)
        if self.cross is not None and context is not None:
            x = self.cross(x, context, context_mask)
        return x


class UNet(nn.Module):
    """eps_theta(x_t, t, cond): the DDPM/ADM UNet, optionally class- or text-conditioned."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        emb_dim = 4 * cfg.ch  # DDPM: time embedding is 4x the base width
        self.time_embed = nn.Sequential(nn.Linear(cfg.ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = None
        if cfg.num_classes is not None:
            self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim)  # +1: the null class
        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.ch, 3, padding=1)

        # down: remember the width of every skip connection for the way up
        widths = [cfg.ch * m for m in cfg.ch_mult]
        skip_chs = [cfg.ch]
        ch = cfg.ch
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, (w, res) in enumerate(zip(widths, cfg.resolutions)):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(UNetBlock(ch, w, cfg, attn=res in cfg.attn_resolutions))
                ch = w
                skip_chs.append(ch)
            self.down_blocks.append(blocks)
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid_block1 = UNetBlock(ch, ch, cfg, attn=True)  # Res, self-attn (+ cross-attn)
        self.mid_block2 = UNetBlock(ch, ch, cfg, attn=False)  # Res

        # up: from the lowest resolution to the highest, one more block per level than down
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w, res = widths[level], cfg.resolutions[level]
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(UNetBlock(ch + skip_chs.pop(), w, cfg, attn=res in cfg.attn_resolutions))
                ch = w
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamples.append(Upsample(ch))

        self.norm_out = normalization(ch, cfg.groups)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.out_ch, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """Predict from x_t (B, in_ch, H, W) at times t (B,) (or a scalar) -> (B, out_ch, H, W).

        cond: None; class labels (B,) long if config.num_classes is set (None = null class);
        or a context (B, L, context_dim) if config.context_dim is set (None = no context).
        context_mask: (B, L) bool, True for real tokens; only with a context.
        t may be fractional. H and W need not equal config.image_size (any size works, odd
        ones too), but attention stays at the levels config.image_size put it at.
        """
        cfg = self.config
        B = x.shape[0]
        t = t.expand(B) if t.ndim == 0 else t  # a scalar time for the whole batch

        # 1. embedding of the time (and the class)
        emb = self.time_embed(timestep_embedding(t, cfg.ch).to(x.dtype))  # (B, 4ch)
        context = None
        if self.class_embed is not None:
            if cond is None:
                cond = torch.full((B,), cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(cond)  # (B, 4ch)
        elif cfg.context_dim is not None:
            context = cond  # (B, L, context_dim) or None
        elif cond is not None:
            raise ValueError("cond given, but the UNet has neither num_classes nor context_dim")
        if context_mask is not None and context is None:
            raise ValueError("context_mask given without a context")

        # 2. down, keeping every intermediate map as a skip connection
        h = self.conv_in(x)  # (B, ch, H, W)
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb, context, context_mask)  # (B, ch*m, H/2^level, W/2^level)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)  # halve H and W
                skips.append(h)

        # 3. middle, at the lowest resolution
        h = self.mid_block1(h, emb, context, context_mask)
        h = self.mid_block2(h, emb)

        # 4. up, concatenating the skips in reverse order along the channels
        for level, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
            if level < len(self.upsamples):
                h = self.upsamples[level](h, size=skips[-1].shape[-2:])  # to the skip's size

        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)


def unet_summary(model: UNet, x_shape: tuple[int, ...], cond: Tensor | None = None,
                 context_mask: Tensor | None = None) -> str:
    """A table of the tensor shapes through `model` for an input of shape x_shape.

    Runs one forward pass (no grad, t = 0, random x) with hooks on the UNet's blocks, in the
    order they run: conv_in, down blocks and downsamplings, middle, up blocks (whose input
    shows the concatenated skip) and upsamplings, conv_out.
    """
    rows = []

    def hook(name):
        def record(module, args, output):
            rows.append((name, type(module).__name__, tuple(args[0].shape), tuple(output.shape),
                         count_params(module)))
        return record

    watched = [("time_embed", model.time_embed), ("conv_in", model.conv_in)]
    for name, module in model.named_modules():
        if isinstance(module, (UNetBlock, Downsample, Upsample)):
            watched.append((name, module))
    watched.append(("conv_out", model.conv_out))
    handles = [m.register_forward_hook(hook(name)) for name, m in watched]
    p = next(model.parameters())
    try:
        with torch.no_grad():
            x = torch.randn(x_shape, device=p.device, dtype=p.dtype)
            t = torch.zeros(x_shape[0], device=p.device)
            model(x, t, cond, context_mask)
    finally:
        for h in handles:
            h.remove()

    header = ("module", "type", "input", "output", "params")
    lines = [header] + [(n, k, str(i), str(o), f"{c:,}") for n, k, i, o, c in rows]
    widths = [max(len(line[j]) for line in lines) for j in range(len(header))]
    fmt = lambda line: "  ".join(s.ljust(w) for s, w in zip(line, widths)).rstrip()
    out = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(line) for line in lines[1:]]
    out.append(f"total parameters: {count_params(model):,}")
    return "\n".join(out)
