"""Pixel-space DDPM on the shipped digits: a tiny UNet that trains on a laptop CPU in under
two minutes and draws recognisable (if blurry) digits. The template for your own runs:

    python -m minildm train configs/tiny_digits_ddpm.py
    python -m minildm train configs/tiny_digits_ddpm.py --steps=2000 --run_dir=runs/longer
    python -m minildm sample runs/tiny_digits_ddpm --n 64 --out grid.png
"""

from minildm.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig
from minildm.unet import UNetConfig

config = TrainConfig(
    stage="diffusion",
    steps=500,
    run_dir="runs/tiny_digits_ddpm",
    data=DataConfig(source="digits", image_size=28, batch_size=32),
    optim=OptimConfig(lr=2e-3, warmup_steps=50, grad_clip=1.0),
    unet=UNetConfig(in_ch=1, out_ch=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(), heads=1, groups=8, image_size=28),
    diffusion=DiffusionConfig(schedule="cosine", T=200, prediction="v"),  # eps left noisy samples at 500 steps
    ema_decay=0.995,
    num_threads=1,
    log_every=25,
    ckpt_every=200,
    n_samples=32,
    sample_steps=50,
)
