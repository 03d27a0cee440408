"""Class-conditional latent diffusion on the digits, with classifier-free guidance: the
latent run of configs/tiny_digits_ldm.py with the labels fed to the UNet (an embedding of
10 classes + 1 "null" class added to the time embedding), the label replaced by "null" for
10% of the images (Ho & Salimans 2022), and sample grids drawn at guidance scale 3.

    python -m minildm train configs/tiny_digits_ldm_class.py
    python -m minildm sample runs/tiny_digits_ldm_class --label 7 --guidance 3 --out sevens.png
    python -m minildm evaluate runs/tiny_digits_ldm_class --guidance 1   # FID, the classes in turn
"""

from minildm.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig
from minildm.data import DATA_DIR
from minildm.unet import UNetConfig

config = TrainConfig(
    stage="diffusion",
    steps=1000,
    run_dir="runs/tiny_digits_ldm_class",
    first_stage=str(DATA_DIR / "checkpoints" / "ae_digits_f4.pt"),  # f=4: 28x28x1 -> 7x7x4
    data=DataConfig(source="digits", image_size=28, batch_size=64),
    optim=OptimConfig(lr=2e-3, warmup_steps=50, grad_clip=1.0),
    unet=UNetConfig(in_ch=4, out_ch=4, ch=32, ch_mult=(1,), num_res_blocks=2, attn_resolutions=(7,),
                    heads=1, groups=8, image_size=7, num_classes=10),
    diffusion=DiffusionConfig(schedule="cosine", T=200, prediction="v", cond_drop=0.1),
    guidance=3.0,
    ema_decay=0.995,
    num_threads=1,
    log_every=25,
    ckpt_every=250,
    n_samples=30,  # three rows of 0..9 in a grid 10 wide
    sample_steps=50,
)
