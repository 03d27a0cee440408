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
from minildm.schedules import Schedule
from minildm.stages import FirstStage, diffusion_terms, encode, null_cond_like, sample_images


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
                  step: int, device: torch.device, held_out: list[Tensor],
                  first_stage: FirstStage | None = None) -> dict:
    """samples/step_*.png (EMA weights) and a line of metrics.jsonl: the validation loss of the
    denoiser at fixed (t, eps), or the PSNR / SSIM of the autoencoder's reconstructions, on
    `held_out` ([x] or [x, cond], `minildm.rundata.validation_batch`, read once per run).
    Conditional models draw the grid for the held-out conditions (the digits 0-9 in turn,
    or the held-out captions) at guidance scale config.guidance."""
    from minildm.metrics import psnr, ssim
    run_dir = Path(config.run_dir)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    batch = [b.to(device) for b in held_out]
    x, cond = batch[0], (batch[1] if len(batch) > 1 else None)
    n = config.n_samples
    with ema.swapped(net) if ema is not None else nullcontext():
        net.eval()
        g = torch.Generator(device).manual_seed(config.seed)
        if config.stage == "diffusion":
            x0 = x if first_stage is None else encode(first_stage, x, g)
            null = None if cond is None else null_cond_like(net, cond)
            terms = diffusion_terms(net, x0, cond, null, schedule, config, g, Rank(0, 1, device))
            metrics = {"val_loss": terms["loss"].item()}
            grid_cond = None if cond is None else sample_conditions(config, cond, n)
            grid = sample_images(net, config, n, grid_cond, config.guidance, "ddim", config.sample_steps,
                                 first_stage, torch.Generator().manual_seed(config.seed))
        else:
            x_rec = net(x, sample=False)[0] if isinstance(net, AutoencoderKL) else net(x)[0]
            metrics = {"psnr": psnr(x_rec.clamp(-1, 1), x).mean().item(),
                       "ssim": ssim(x_rec.clamp(-1, 1), x).mean().item()}
            pick = torch.linspace(0, len(x) - 1, min(n, len(x))).long()  # every class
            grid = torch.cat([x[pick], x_rec[pick]])  # originals above their reconstructions
        net.train()
    nrow = config.unet.num_classes if config.stage == "diffusion" and config.unet.num_classes else 8
    save_png(grid, run_dir / "samples" / f"step_{step:09d}.png", nrow)  # a class per column
    record = {"step": step, **metrics}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def sample_conditions(config: TrainConfig, held_out: Tensor, n: int) -> Tensor:
    """The conditions of a sample grid of n images: the classes 0, 1, ..., K-1, 0, ... (one
    column per class in a grid 8 or 10 wide), or the first n held-out captions."""
    if config.unet.num_classes is not None:
        return torch.arange(n, device=held_out.device) % config.unet.num_classes
    return held_out[torch.arange(n) % len(held_out)]
