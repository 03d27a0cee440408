"""The first stage on the shipped digits: a small KL autoencoder (f = 4, 28 -> 7x7x2 latents)
with LDM's reconstruction objective (Sec. 3.1): L1 under a learned log-variance and a 1e-6
KL. About a minute on a laptop CPU; the VQ version is configs/tiny_digits_vq.py, and
configs/tiny_shapes_kl.py adds the perceptual and patch-adversarial terms on RGB images.

The patch discriminator is configured but off (disc_weight=0). Measured here at 400 steps:
switching it on from step 200 (--loss.disc_weight=0.5) lowered the held-out PSNR from 26.6 to
19.6 dB: adversarial terms trade PSNR for realism, and they need a well-trained autoencoder
first (LDM starts them after 50k steps).

    python -m minildm train configs/tiny_digits_kl.py
    python -m minildm evaluate runs/tiny_digits_kl                  # PSNR / SSIM, held-out digits
    python -m minildm train configs/tiny_digits_ldm.py --first_stage=runs/tiny_digits_kl \
        --unet.in_ch=2 --unet.out_ch=2 --run_dir=runs/ldm_on_my_ae  # diffusion in its latents
"""

from minildm.autoencoder import AutoencoderConfig
from minildm.config import DataConfig, OptimConfig, TrainConfig
from minildm.firststage import FirstStageLoss
from minildm.losses import PatchDiscriminatorConfig

config = TrainConfig(
    stage="autoencoder",
    steps=400,
    run_dir="runs/tiny_digits_kl",
    data=DataConfig(source="digits", image_size=28, batch_size=32),
    optim=OptimConfig(lr=2e-3, betas=(0.5, 0.9), warmup_steps=20, grad_clip=None),
    autoencoder=AutoencoderConfig(in_ch=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_ch=2,
                                  groups=8, attn_mid=False),
    loss=FirstStageLoss(reconstruction="l1", kl_weight=1e-6, learn_logvar=True,
                        disc_weight=0.0, disc_start=200,  # LDM: 0.5, from step 50,001
                        discriminator=PatchDiscriminatorConfig(in_ch=1, ndf=16, n_layers=2)),  # 22 px patches
    ema_decay=None,
    num_threads=1,
    log_every=25,
    ckpt_every=200,
)
