"""What a run shows while it trains (rank 0): sample grids as PNG and validation metrics as JSON.

    samples/step_*.png  diffusion: samples from the EMA weights; autoencoder: originals
                        above their reconstructions
    metrics.jsonl       diffusion: the validation loss at fixed (t, eps); autoencoder:
                        PSNR and SSIM of the held-out images
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from minildm.autoencoder import AutoencoderKL
from minildm.config import TrainConfig
from minildm.distributed import Rank
from minildm.ema import EMA
from minildm.rundata import validation_images
from minildm.schedules import Schedule
from minildm.stages import diffusion_terms


def save_png(x: Tensor, path: Path, nrow: int = 8) -> None:
    """Save a batch (B, C, H, W) in [-1, 1] as one grid image (PNG via Pillow), atomically."""
    from PIL import Image

    from minildm.plotting import make_grid
    grid = ((make_grid(x.float().cpu().clamp(-1, 1), nrow) + 1) * 127.5).round().to(torch.uint8)  # (C, H, W)
    array = grid[0].numpy() if grid.shape[0] == 1 else grid.permute(1, 2, 0).numpy()
    tmp = path.with_name(f".tmp-{path.name}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def write_samples(config: TrainConfig, net: nn.Module, ema: EMA | None, schedule: Schedule | None,
                  step: int, device: torch.device) -> dict:
    """samples/step_*.png (EMA weights) and a line of metrics.jsonl: the validation loss of the
    denoiser at fixed (t, eps), or the PSNR / SSIM of the autoencoder's reconstructions."""
    from minildm.metrics import psnr, ssim
    from minildm.sampling import sample_ddim
    run_dir = Path(config.run_dir)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    x = validation_images(config, 256).to(device)
    n = config.n_samples
    with ema.swapped(net) if ema is not None else nullcontext():
        net.eval()
        g = torch.Generator(device).manual_seed(config.seed)
        if config.stage == "diffusion":
            metrics = {"val_loss": diffusion_terms(net, x, schedule, config, g, Rank(0, 1, device))["loss"].item()}
            noise = torch.randn((n, *x.shape[1:]), device=device, generator=g)
            grid = sample_ddim(net, noise, schedule, min(config.sample_steps, schedule.T),
                               prediction=config.diffusion.prediction, clip_x0=1.0)
        else:
            x_rec = net(x, sample=False)[0] if isinstance(net, AutoencoderKL) else net(x)[0]
            metrics = {"psnr": psnr(x_rec.clamp(-1, 1), x).mean().item(),
                       "ssim": ssim(x_rec.clamp(-1, 1), x).mean().item()}
            pick = torch.linspace(0, len(x) - 1, min(n, len(x))).long()  # every class
            grid = torch.cat([x[pick], x_rec[pick]])  # originals above their reconstructions
        net.train()
    save_png(grid, run_dir / "samples" / f"step_{step:09d}.png")
    record = {"step": step, **metrics}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
