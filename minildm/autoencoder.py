"""The first stage of latent diffusion: an autoencoder that compresses x into a latent z.

Rombach et al. (2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
Sec. 3.1): an encoder E maps an image x (B, C, H, W) to a latent z = E(x) of shape
(B, z_ch, H/f, W/f), downsampled by a factor f = 2**m, and a decoder D maps it back,
x_rec = D(z). z keeps a two-dimensional structure (height and width), so the diffusion
UNet of the second stage can use its convolutional inductive biases on it. To avoid
high-variance latent spaces, z is regularised in one of two ways:

    AutoencoderKL   a VAE: E outputs a diagonal Gaussian q(z | x); a small KL penalty
                    pulls it toward N(0, I) (LDM uses a weight of 1e-6)
    VQAutoencoder   a vector-quantization layer (van den Oord et al. 2017; Esser et al.
                    2021, VQGAN) snaps z to the nearest entry of a learned codebook

Layout of the encoder and decoder (LDM's `ldm/modules/diffusionmodules/model.py`, itself
taming-transformers', built here from the blocks in `minildm.nn`):

    Encoder: conv_in; per level num_res_blocks x ResBlock, then Downsample (except at the
             last level); middle ResBlock, self-attention, ResBlock; GN, SiLU, conv_out
    Decoder: conv_in; middle ResBlock, self-attention, ResBlock; per level from the lowest
             resolution (num_res_blocks + 1) x ResBlock, then Upsample (except at the top);
             GN, SiLU, conv_out

LDM also puts 1x1 convs (`quant_conv`, `post_quant_conv`) between the encoder, the latent
and the decoder; right after a 3x3 conv_out (or before a 3x3 conv_in) a 1x1 conv is a
second linear map that adds nothing, so they are left out here.

The latent scale factor: the diffusion stage wants latents of about unit variance, so the
first-stage model carries a buffer `scale_factor` measured from data by
`measure_scale_factor` (LDM, Sec. 4.3.2 and Appendix G), used by `encode_latents` /
`decode_latents`, and saved in the state_dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minildm.nn import Downsample, ResBlock, SelfAttention2d, Upsample, normalization
from minildm.quantize import QuantizerConfig, QuantizerOutput, VectorQuantizer


@dataclass
class AutoencoderConfig:
    in_ch: int = 3  # image channels: 1 grey digits, 3 RGB; the decoder outputs the same
    ch: int = 32  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 2)  # one entry per level; f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 1  # ResBlocks per level in the encoder (the decoder has one more)
    z_ch: int = 4  # latent channels (Stable Diffusion: 4 at f = 8)
    groups: int = 8  # GroupNorm groups; must divide ch * m for every m in ch_mult
    attn_mid: bool = True  # self-attention in the middle (lowest resolution) of both nets
    heads: int = 1  # heads of the middle attention; must divide ch * ch_mult[-1]
    dropout: float = 0.0  # dropout inside the ResBlocks

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        for name in ("in_ch", "ch", "num_res_blocks", "z_ch", "groups", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if len(self.ch_mult) == 0 or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        widths = [self.ch * m for m in self.ch_mult]
        for w in widths:
            if w % self.groups != 0:
                raise ValueError(f"groups={self.groups} must divide every width ch * ch_mult = {widths}; "
                                 f"{w} is not divisible")
        if self.attn_mid and widths[-1] % self.heads != 0:
            raise ValueError(f"heads={self.heads} must divide the middle width {widths[-1]}")

    @property
    def downsampling_factor(self) -> int:
        """f: each level after the first halves the height and the width."""
        return 2 ** (len(self.ch_mult) - 1)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """Shape (z_ch, H/f, W/f) of the latent of one H x W image."""
        width = height if width is None else width
        f = self.downsampling_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by the downsampling "
                             f"factor f={f}; crop or pad it (e.g. load_digits(size=32) for f <= 32)")
        return (self.z_ch, height // f, width // f)


@dataclass
class VQAutoencoderConfig(AutoencoderConfig):
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)  # its dim must equal z_ch

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.quantizer, dict):  # as read back from a checkpoint
            self.quantizer = QuantizerConfig(**self.quantizer)
        if self.quantizer.dim != self.z_ch:
            raise ValueError(f"quantizer.dim={self.quantizer.dim} must equal z_ch={self.z_ch}: "
                             f"each code replaces one latent vector of z_ch channels")


# -----------------------------------------------------------------------------
# encoder and decoder

class Encoder(nn.Module):
    """E: image (B, in_ch, H, W) -> features (B, out_ch, H/f, W/f). out_ch = 2 z_ch for a
    Gaussian posterior (mean and log-variance), z_ch for a quantizer."""

    def __init__(self, config: AutoencoderConfig, out_ch: int):
        super().__init__()
        cfg = self.config = config
        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.ch, 3, padding=1)
        ch = cfg.ch
        self.down = nn.ModuleList()
        for level, m in enumerate(cfg.ch_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, cfg.ch * m, None, cfg.dropout, cfg.groups))
                ch = cfg.ch * m
            if level < len(cfg.ch_mult) - 1:
                blocks.append(Downsample(ch))
            self.down.append(nn.Sequential(*blocks))
        self.mid = nn.Sequential(
            ResBlock(ch, ch, None, cfg.dropout, cfg.groups),
            SelfAttention2d(ch, cfg.heads, cfg.groups) if cfg.attn_mid else nn.Identity(),
            ResBlock(ch, ch, None, cfg.dropout, cfg.groups),
        )
        self.norm_out = normalization(ch, cfg.groups)
        self.conv_out = nn.Conv2d(ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        self.config.latent_shape(*x.shape[-2:])  # raises a clear error if f does not divide H, W
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch * m, H / 2^level, W / 2^level)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H/f, W/f)


class Decoder(nn.Module):
    """D: latent (B, z_ch, h, w) -> image (B, in_ch, f h, f w), unbounded (no tanh, as in LDM)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        cfg = self.config = config
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_ch, ch, 3, padding=1)
        self.mid = nn.Sequential(
            ResBlock(ch, ch, None, cfg.dropout, cfg.groups),
            SelfAttention2d(ch, cfg.heads, cfg.groups) if cfg.attn_mid else nn.Identity(),
            ResBlock(ch, ch, None, cfg.dropout, cfg.groups),
        )
        self.up = nn.ModuleList()  # from the lowest resolution to the highest
        for level in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, cfg.ch * cfg.ch_mult[level], None, cfg.dropout, cfg.groups))
                ch = cfg.ch * cfg.ch_mult[level]
            if level > 0:
                blocks.append(Upsample(ch))
            self.up.append(nn.Sequential(*blocks))
        self.norm_out = normalization(ch, cfg.groups)
        self.conv_out = nn.Conv2d(ch, cfg.in_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in self.up:
            h = level(h)  # doubles H and W, except at the top level
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, in_ch, f h, f w)


# -----------------------------------------------------------------------------
# the VAE posterior q(z | x)

class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) over latents of shape (B, C, H, W).

    Built from the encoder output `params` (B, 2C, H, W): the first C channels are the mean,
    the last C the log-variance, clamped to [-30, 20] as in LDM so that exp() stays finite.
    Half-precision params (from bf16 autocast) are cast to float32. `kl` and `nll` are summed
    over the C * H * W latent dimensions and returned per image, shape (B,); the training
    loss takes their mean over the batch (as LDM: sum over dims, divide by the batch size).
    """

    def __init__(self, params: Tensor):
        if params.dtype in (torch.float16, torch.bfloat16):
            params = params.float()
        self.mean, logvar = params.chunk(2, dim=1)  # (B, C, H, W) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (Kingma &
        Welling 2014), so gradients flow to mean and std."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The most likely z: the mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q(z | x) || N(0, I)) per image, in nats, shape (B,):

            KL = 1/2 sum_i (mean_i^2 + var_i - 1 - logvar_i)

        (the KL between two Gaussians, per dimension, with the second one standard normal;
        Kingma & Welling 2014, Appendix B), summed over the C * H * W latent dimensions."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).flatten(1).sum(1)

    def nll(self, z: Tensor) -> Tensor:
        """-log q(z | x) per image, in nats, shape (B,):
        1/2 sum_i (log(2 pi) + logvar_i + (z_i - mean_i)^2 / var_i)."""
        return 0.5 * (math.log(2 * math.pi) + self.logvar
                      + (z.to(self.mean.dtype) - self.mean).square() / self.var).flatten(1).sum(1)


# -----------------------------------------------------------------------------
# the latent scale factor, shared by both first-stage models

class _LatentScaling(nn.Module):
    """The `scale_factor` buffer and the encode / decode helpers of the diffusion stage.

    Subclasses define `latents(x, generator)` (unscaled z) and `decode_unscaled(z)`.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("scale_factor", torch.tensor(1.0))  # set by measure_scale_factor

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latents for the diffusion model: scale_factor * z, z the first stage's latent."""
        return self.scale_factor * self.latents(x, generator)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Images from latents made by `encode_latents` (or sampled by the diffusion model)."""
        return self.decode_unscaled(z / self.scale_factor)


class AutoencoderKL(_LatentScaling):
    """The KL-regularised autoencoder of LDM (Sec. 3.1): a VAE whose posterior q(z | x) is
    a DiagonalGaussian with a spatial latent (B, z_ch, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, out_ch=2 * config.z_ch)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z | x) for images x (B, in_ch, H, W)."""
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """x_rec = D(z), z (B, z_ch, h, w) -> (B, in_ch, f h, f w)."""
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """(x_rec, posterior): decode a sample of q(z | x) (or its mean if sample=False)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z.to(x.dtype)), posterior

    def latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Unscaled latents: a sample of q(z | x), as LDM's `get_first_stage_encoding`."""
        return self.encode(x).sample(generator)

    def decode_unscaled(self, z: Tensor) -> Tensor:
        return self.decode(z)


class FlatAutoencoderKL(AutoencoderKL):
    """AutoencoderKL with a 1-D bottleneck, the contrast of lesson 04 (LDM Sec. 3: "a
    two-dimensional structure" of z vs the arbitrary 1-D ordering of earlier work).

    The encoder's (z_ch, h, w) features are flattened, and one dense layer gives the mean
    and log-variance of n = z_ch h w latent values with no spatial layout, a (B, n, 1, 1)
    latent; a dense layer maps z back to (z_ch, h, w) for the decoder. Same number of
    latent values as AutoencoderKL, so the two compare at one compression rate.
    """

    def __init__(self, config: AutoencoderConfig, image_size: int):
        super().__init__(config)
        self.latent = config.latent_shape(image_size)  # (z_ch, h, w)
        n = self.latent[0] * self.latent[1] * self.latent[2]
        self.encoder = Encoder(config, out_ch=config.z_ch)  # features, not yet a Gaussian
        self.to_z = nn.Linear(n, 2 * n)  # mixes every position into every latent value
        self.from_z = nn.Linear(n, n)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        h = self.encoder(x).flatten(1)  # (B, n)
        return DiagonalGaussian(self.to_z(h)[:, :, None, None])  # (B, 2n, 1, 1)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.from_z(z.flatten(1)).view(-1, *self.latent))  # (B, in_ch, H, W)


class VQAutoencoder(_LatentScaling):
    """The VQ-regularised autoencoder of LDM (Sec. 3.1), VQGAN's layout: the encoder's
    latent z_e (B, z_ch, H/f, W/f) is replaced position by position by its nearest code
    of `minildm.quantize.VectorQuantizer`, and the decoder reads the codes."""

    def __init__(self, config: VQAutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, out_ch=config.z_ch)
        self.quantizer = VectorQuantizer(config.quantizer)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor) -> Tensor:
        """z_e = E(x), the continuous latent before quantization, (B, z_ch, H/f, W/f)."""
        return self.encoder(x)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        """Snap each latent vector of z (B, z_ch, h, w) to its nearest code."""
        return self.quantizer(z)

    def decode(self, z_q: Tensor) -> Tensor:
        """x_rec = D(z_q), z_q (B, z_ch, h, w) -> (B, in_ch, f h, f w)."""
        return self.decoder(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images from code indices (B, h, w): look the codes up, then decode."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """(x_rec, quantizer output): encode, quantize, decode."""
        q = self.quantize(self.encode(x))
        return self.decode(q.z_q.to(x.dtype)), q

    def latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Unscaled latents: z_e, before quantization, as LDM's VQ first stage (the decoder
        quantizes, so the diffusion model works in a continuous space). `generator` is
        unused (z_e is deterministic); it keeps the signature of AutoencoderKL.latents."""
        return self.encode(x)

    def decode_unscaled(self, z: Tensor) -> Tensor:
        """Quantize z, then decode (the decoder "absorbs" the quantization, LDM Sec. 3.1)."""
        return self.decode(self.quantize(z).z_q)


@torch.no_grad()
def measure_scale_factor(model: _LatentScaling, images: Tensor, batch_size: int = 256,
                         generator: torch.Generator | None = None) -> float:
    """Set model.scale_factor to 1 / std(z) over the latents of `images`, and return it.

    LDM (Sec. 4.3.2, Appendix G) rescales the latents "component-wise" by one number
    measured on the first batch of data, so that the diffusion model sees z of about unit
    standard deviation, as its noise schedule assumes: with std(z) = 5 the noise at a
    given t would be 5x too weak relative to the signal. The well-known 0.18215 is that
    number for Stable Diffusion's KL-f8 autoencoder on its data; any other autoencoder,
    training run or dataset has its own, so it is measured here, never hard-coded.
    The std is taken over all latent values at once (batch, channels and positions), of
    samples of q(z | x) for a KL model (what the diffusion model will be trained on).
    """
    was_training = model.training
    model.eval()
    device = model.scale_factor.device
    z = torch.cat([model.latents(xb.to(device), generator).float() for xb in images.split(batch_size)])
    scale = 1.0 / z.std().item()
    model.scale_factor.fill_(scale)
    model.train(was_training)
    return scale


# -----------------------------------------------------------------------------
# checkpoints

def save_autoencoder(model: AutoencoderKL | VQAutoencoder, path: str | Path, half: bool = False,
                     **meta) -> None:
    """Save the config, the weights (with scale_factor) and any `meta` values (steps, loss
    weights, measured PSNR, ...) to `path`. half=True stores floating tensors as float16
    (half the file; `load_autoencoder` casts back to float32)."""
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    kind = "vq" if isinstance(model, VQAutoencoder) else "kl"
    torch.save({"kind": kind, "config": asdict(model.config), "state_dict": state, "meta": meta}, path)


def load_autoencoder(path: str | Path, map_location: str | torch.device = "cpu"
                     ) -> tuple[AutoencoderKL | VQAutoencoder, dict]:
    """(model in eval mode with float32 weights, meta) from a file written by `save_autoencoder`."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if ckpt["kind"] == "vq":
        model = VQAutoencoder(VQAutoencoderConfig(**ckpt["config"]))
    else:
        model = AutoencoderKL(AutoencoderConfig(**ckpt["config"]))
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in ckpt["state_dict"].items()})
    return model.eval(), ckpt["meta"]
