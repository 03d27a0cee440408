"""Latent diffusion as a composition: frozen first stage + denoiser over latents + schedule.

Rombach et al. (2022, Sec. 3.2): train the diffusion model not on images x but on the
latents z = E(x) of a pretrained autoencoder, then decode its samples with D:

    L_LDM = E_{z = E(x), c, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, tau_theta(c)) ||^2     (Eq. 2, 3)

The autoencoder is frozen, so every image's latent can be computed once and cached
(`encode_dataset`, `cached_latents`); training is then plain diffusion training on the
cached tensor (`minildm.train.train_denoiser`), and the first stage is only needed again to
decode samples. `LatentDiffusion` holds the three pieces side by side (no subclassing):

    first_stage   AutoencoderKL or VQAutoencoder with its measured scale_factor (frozen),
                  or None: the identity, i.e. a pixel-space model (LDM-1 in Fig. 6)
    denoiser      a UNet (unconditional or class-conditional) or a TextConditionedUNet,
                  called as denoiser(z_t, t[, cond])
    schedule      the noise schedule, and `prediction` (what the denoiser predicts)

    ldm = LatentDiffusion(ae, unet, cosine_schedule(1000), prediction="v")
    z = cached_latents(ae, images, "/tmp/latents.pt")               # (N, z_ch, H/f, W/f)
    train_denoiser(ldm.denoiser, batches(z, labels, batch_size=64), ldm.schedule, ...)
    x = ldm.sample(labels, guidance_scale=3.0, image_size=32)       # (B, C, H, W) images
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from minildm.autoencoder import AutoencoderKL, VQAutoencoder, load_autoencoder
from minildm.checkpoint import save_atomic
from minildm.diffusion import Prediction
from minildm.guidance import guided
from minildm.sampling import sample_ddim
from minildm.schedules import Schedule
from minildm.text import TextConditionedUNet, TextEncoder, TextEncoderConfig
from minildm.unet import UNet, UNetConfig

FirstStage = AutoencoderKL | VQAutoencoder
Sampler = Callable[..., Tensor]  # sample_ddpm / sample_ddim / sample_heun of minildm.sampling


# -----------------------------------------------------------------------------
# 1. encode once, cache

@torch.no_grad()
def encode_dataset(first_stage: FirstStage, images: Tensor, batch_size: int = 256,
                   generator: torch.Generator | None = None) -> Tensor:
    """Scaled latents scale_factor * z, z ~ q(z | x), of images (N, C, H, W) -> (N, z_ch, H/f, W/f),
    float32 on the CPU, batch by batch (`encode_latents`: one posterior sample per image, as
    LDM's `get_first_stage_encoding`; the KL model's posterior std is tiny at weight 1e-6)."""
    first_stage.eval()
    device = first_stage.scale_factor.device
    return torch.cat([first_stage.encode_latents(xb.to(device), generator).float().cpu()
                      for xb in images.split(batch_size)])


def fingerprint(first_stage: FirstStage, images: Tensor | None = None, *extra: str) -> str:
    """sha256 of the first stage's weights (with its scale factor), of a data tensor (the
    images, or a folder's caption token ids; if given) and of `extra` strings (e.g. an image
    folder's file list): a cache key that changes when any of them does."""
    h = hashlib.sha256()
    for name, t in sorted(first_stage.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    if images is not None:
        h.update(str(tuple(images.shape)).encode())
        h.update(images.detach().cpu().contiguous().numpy().tobytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()


def cached(path: str | Path, key: str, compute: Callable[[], dict[str, Tensor]],
           write: bool = True) -> dict[str, Tensor]:
    """`compute()` once, kept in `path` with its `key`: a later call with the same key reads
    the file instead. A file with another key, or one that cannot be read (truncated, not a
    tensor file), is recomputed and replaced; `write=False` (a DDP rank other than 0) only
    reads. The file is written atomically and read with weights_only=True."""
    path = Path(path)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # any unreadable file is a cache miss: recompute and overwrite it
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved["tensors"]
    tensors = compute()
    if write:
        save_atomic({"key": key, "tensors": tensors}, path)
    return tensors


def cached_latents(first_stage: FirstStage, images: Tensor, path: str | Path, batch_size: int = 256,
                   seed: int = 0) -> Tensor:
    """`encode_dataset` once, kept in `path`: a later call with the same first stage and the
    same images reads the file instead (a changed model or dataset re-encodes and overwrites
    it). The posterior samples are drawn from a generator seeded by `seed`."""
    key = fingerprint(first_stage, images, f"seed={seed}")
    return cached(path, key, lambda: {"latents": encode_dataset(first_stage, images, batch_size,
                                                                torch.Generator().manual_seed(seed))})["latents"]


# -----------------------------------------------------------------------------
# 2. the composition

def null_condition(denoiser: nn.Module) -> Tensor | None:
    """The null condition of classifier-free guidance for this denoiser: the extra class K of
    a class-conditional UNet, the empty caption of a TextConditionedUNet, None otherwise."""
    if isinstance(denoiser, TextConditionedUNet):
        return torch.full((denoiser.encoder.config.max_len,), denoiser.pad_id, dtype=torch.long)
    if isinstance(denoiser, UNet) and denoiser.config.num_classes is not None:
        return torch.tensor(denoiser.config.num_classes)
    return None


class LatentDiffusion(nn.Module):
    """A frozen first stage (or None for pixel space), a denoiser over its latents, a schedule."""

    def __init__(self, first_stage: FirstStage | None, denoiser: nn.Module, schedule: Schedule,
                 prediction: Prediction = "v"):
        super().__init__()
        if first_stage is not None:
            first_stage.requires_grad_(False).eval()  # frozen: LDM trains the two stages apart
        self.first_stage, self.denoiser = first_stage, denoiser
        self.schedule, self.prediction = schedule, prediction

    @property
    def f(self) -> int:
        """The downsampling factor of the first stage (1 in pixel space)."""
        return 1 if self.first_stage is None else self.first_stage.config.downsampling_factor

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(channels, h, w) the denoiser works on for image_size x image_size images."""
        if self.first_stage is None:
            return (self.denoiser_unet().config.in_ch, image_size, image_size)
        return self.first_stage.config.latent_shape(image_size)

    def denoiser_unet(self) -> UNet:
        return self.denoiser.unet if isinstance(self.denoiser, TextConditionedUNet) else self.denoiser

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, C, H, W) -> scaled latents (B, z_ch, H/f, W/f); identity in pixel space."""
        return x if self.first_stage is None else self.first_stage.encode_latents(x, generator)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images, clamped to [-1, 1]; identity (clamped) in pixel space."""
        x = z if self.first_stage is None else self.first_stage.decode_latents(z.float())
        return x.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, cond: Tensor | None = None, n: int | None = None, *, image_size: int = 32,
               guidance_scale: float = 1.0, sampler: Sampler = sample_ddim, steps: int | None = 25,
               generator: torch.Generator | None = None, decode: bool = True) -> Tensor:
        """Sample latents with `sampler` (any of `minildm.sampling`; steps=None for sample_ddpm,
        which takes all T) and decode them: (B, C, image_size, image_size) in [-1, 1].

        cond: (B,) class labels or (B, L) token ids, one per sample; None with `n` samples of
        the unconditional model. guidance_scale s: classifier-free guidance, pred_null +
        s (pred_cond - pred_null) (`minildm.guidance.guided`); 1 = the conditional model.
        The starting noise z_T ~ N(0, I) is drawn from `generator`.
        """
        device = next(self.denoiser.parameters()).device
        if cond is None:
            if n is None:
                raise ValueError("pass cond (one condition per sample) or n (unconditional samples)")
            model = lambda zt, t: self.denoiser(zt, t)  # noqa: E731
        else:
            cond = cond.to(device)
            n = cond.shape[0]
            null = null_condition(self.denoiser)
            if null is None:
                raise ValueError("cond given, but the denoiser is unconditional")
            model = guided(self.denoiser, cond, null, guidance_scale)
        z = torch.randn((n, *self.latent_shape(image_size)), generator=generator).to(device)
        kwargs = {} if steps is None else {"steps": steps}
        self.denoiser.eval()
        z0 = sampler(model, z, self.schedule, prediction=self.prediction, generator=generator, **kwargs)
        return self.decode(z0) if decode else z0


# -----------------------------------------------------------------------------
# 3. checkpoints: the denoiser, its schedule, and the name of the first-stage file

def save_ldm(ldm: LatentDiffusion, path: str | Path, first_stage_file: str | None, **meta) -> None:
    """Save the denoiser's configs and float16 weights, the schedule's betas, the prediction
    and the first stage's file name (read from the same folder by `load_ldm`; None for a
    pixel-space model), plus any `meta` (plain numbers, lists, strings). Loads with
    weights_only=True."""
    den = ldm.denoiser
    text = asdict(den.encoder.config) if isinstance(den, TextConditionedUNet) else None
    state = {k: v.half() if v.is_floating_point() else v for k, v in den.state_dict().items()}
    torch.save({"unet_config": asdict(ldm.denoiser_unet().config), "text_config": text,
                "state_dict": state, "betas": ldm.schedule.betas.clone(), "prediction": ldm.prediction,
                "first_stage": first_stage_file, "meta": meta}, path)


def load_ldm(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[LatentDiffusion, dict]:
    """(LatentDiffusion in eval mode with float32 weights, meta) from `save_ldm`'s file."""
    path = Path(path)
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    unet = UNet(UNetConfig(**ckpt["unet_config"]))
    den = unet if ckpt["text_config"] is None else TextConditionedUNet(
        unet, TextEncoder(TextEncoderConfig(**ckpt["text_config"])))
    ref = den.state_dict()
    den.load_state_dict({k: v.to(ref[k].dtype) for k, v in ckpt["state_dict"].items()})
    first_stage = None
    if ckpt["first_stage"] is not None:
        fs_path = path.parent / ckpt["first_stage"]
        if not fs_path.is_file():
            raise FileNotFoundError(f"{path} needs its first stage {fs_path}; put that file beside it")
        first_stage, _ = load_autoencoder(fs_path, map_location)
        if "scale_factor" in ckpt["meta"]:  # the factor measured when the latents were cached
            first_stage.scale_factor.fill_(ckpt["meta"]["scale_factor"])
    ldm = LatentDiffusion(first_stage, den.eval(), Schedule(ckpt["betas"]), ckpt["prediction"])
    return ldm, ckpt["meta"]
