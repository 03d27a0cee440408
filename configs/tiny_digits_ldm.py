"""Latent diffusion on the shipped digits: a tiny UNet trained on the 7x7x4 latents of the
shipped KL f=4 first stage (data/checkpoints/ae_digits_f4.pt, built by
data/build_ae_checkpoints.py), decoded back to 28x28 digits for the sample grids and for
`evaluate`. The whole pipeline of LDM, on a laptop CPU in about two minutes:

    python -m minildm train configs/tiny_digits_ldm.py
    python -m minildm sample runs/tiny_digits_ldm --n 64 --out grid.png
    python -m minildm evaluate runs/tiny_digits_ldm          # FID / KID of the decoded samples

Point `first_stage` at your own first stage (an autoencoder run folder, e.g.
--first_stage=runs/tiny_digits_kl) and set unet.in_ch / out_ch / image_size to its latents.
The training images are encoded once (one posterior sample each); the latents are rescaled
by 1 / std measured on the first 1,000 of them (LDM Sec. 4.3.2).
"""

from minildm.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig
from minildm.data import DATA_DIR
from minildm.unet import UNetConfig

config = TrainConfig(
    stage="diffusion",
    steps=1000,
    run_dir="runs/tiny_digits_ldm",
    first_stage=str(DATA_DIR / "checkpoints" / "ae_digits_f4.pt"),  # f=4: 28x28x1 -> 7x7x4
    data=DataConfig(source="digits", image_size=28, batch_size=64),
    optim=OptimConfig(lr=2e-3, warmup_steps=50, grad_clip=1.0),
    unet=UNetConfig(in_ch=4, out_ch=4, ch=32, ch_mult=(1,), num_res_blocks=2,
                    attn_resolutions=(7,), heads=1, groups=8, image_size=7),
    diffusion=DiffusionConfig(schedule="cosine", T=200, prediction="v"),
    ema_decay=0.995,
    num_threads=1,
    log_every=25,
    ckpt_every=250,
    n_samples=32,
    sample_steps=50,
)
