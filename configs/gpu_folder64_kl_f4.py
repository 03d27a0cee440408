"""GPU recipe, stage 1 of 2: LDM's KL-regularised first stage (f=4, 64x64x3 -> 16x16x3)
for a folder of your own 64 px images (faces, bedrooms, ...), with LDM's objective
(Rombach et al. 2022, Sec. 3.1 and Appendix G; taming-transformers' LPIPSWithDiscriminator):
L1 + perceptual (weight 1) with a learned log-variance, KL weight 1e-6, and a patch
discriminator (hinge loss, adaptive weight, weight 0.5) switched on after 50k steps.
Adam betas (0.5, 0.9); LDM's learning rate 4.5e-6 per image of the global batch.

    torchrun --standalone --nproc_per_node=8 -m minildm train configs/gpu_folder64_kl_f4.py \
        --data.path=/data/my_images --resume
    python -m minildm evaluate runs/folder64_kl_f4               # PSNR / SSIM on the folder

Then train the diffusion model in its latents: configs/gpu_folder64_ldm_f4.py.
Throughput: not measured (no GPU in this session); the parameters and the training FLOPs
per image (counted) are in the docs table.
"""

from minildm.autoencoder import AutoencoderConfig
from minildm.config import DataConfig, OptimConfig, TrainConfig
from minildm.firststage import FirstStageLoss
from minildm.losses import PatchDiscriminatorConfig

BATCH = 64  # global batch over all GPUs (and accumulation steps)

config = TrainConfig(
    stage="autoencoder",
    steps=150_000,
    run_dir="runs/folder64_kl_f4",
    data=DataConfig(source="folder", path=None, image_size=64, batch_size=BATCH, num_workers=8),
    optim=OptimConfig(lr=4.5e-6 * BATCH, betas=(0.5, 0.9), warmup_steps=0, cosine=False, grad_clip=None),
    autoencoder=AutoencoderConfig(in_ch=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_ch=3, groups=32,
                                  attn_mid=True, heads=1),
    loss=FirstStageLoss(reconstruction="l1", kl_weight=1e-6, perceptual_weight=1.0, learn_logvar=True,
                        disc_weight=0.5, disc_start=50_001, gan_loss="hinge",
                        discriminator=PatchDiscriminatorConfig(in_ch=3, ndf=64, n_layers=3)),
    ema_decay=None,  # LDM keeps no EMA of the first stage
    device="auto",
    bf16=True,
    tf32=True,
    log_every=50,
    ckpt_every=5_000,
    keep_last=3,
    sample_every=5_000,
    n_samples=8,
)
