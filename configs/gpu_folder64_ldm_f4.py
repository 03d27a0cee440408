"""GPU recipe, stage 2 of 2: an unconditional latent diffusion model on the 16x16x3 latents of
configs/gpu_folder64_kl_f4.py (train that first; this points at its run folder), in LDM's
settings (Rombach et al. 2022, Appendix E): linear betas, T = 1000, eps-prediction,
L_simple, AdamW at a constant 1e-4 after a 1_000-step warm-up, EMA 0.9999, bf16 autocast.
Sample grids are decoded with the first stage; the scale factor is measured at the start.

    torchrun --standalone --nproc_per_node=8 -m minildm train configs/gpu_folder64_ldm_f4.py \
        --data.path=/data/my_images --resume
    python -m minildm sample runs/folder64_ldm_f4 --n 64 --out grid.png --steps 200

Throughput: not measured (no GPU in this session); the parameters and the training FLOPs
per image (counted) are in the docs table.
"""

from minildm.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig
from minildm.unet import UNetConfig

config = TrainConfig(
    stage="diffusion",
    steps=200_000,
    run_dir="runs/folder64_ldm_f4",
    first_stage="runs/folder64_kl_f4",  # the run folder of stage 1 (its newest checkpoint)
    data=DataConfig(source="folder", path=None, image_size=64, batch_size=128, num_workers=8,
                    encode_once=True),  # the frozen encoder costs more per image than the UNet
    optim=OptimConfig(lr=1e-4, betas=(0.9, 0.999), warmup_steps=1_000, cosine=False, grad_clip=1.0),
    unet=UNetConfig(in_ch=3, out_ch=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2,
                    attn_resolutions=(8, 4), heads=4, groups=32, image_size=16),
    diffusion=DiffusionConfig(schedule="linear", T=1000, prediction="eps", weighting="simple"),
    ema_decay=0.9999,
    device="auto",
    bf16=True,
    tf32=True,
    log_every=50,
    ckpt_every=5_000,
    keep_last=3,
    sample_every=10_000,
    n_samples=16,
    sample_steps=100,
)
