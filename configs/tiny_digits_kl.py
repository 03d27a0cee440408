"""The first stage on the shipped digits: a small KL autoencoder (f = 4, 28 -> 7x7x2 latents)
trained with LDM's objective (Sec. 3.1): L1 reconstruction, a 1e-6 KL, a learned
log-variance, and from step 200 a patch discriminator weighted adaptively (VQGAN Eq. 7).
No perceptual term: the perceptual net reads RGB (see configs/tiny_shapes_kl.py). A few
minutes on a laptop CPU at most; the VQ version is configs/tiny_digits_vq.py.

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
                        disc_weight=0.5, disc_start=200,  # LDM: 0.5, from step 50,001
                        discriminator=PatchDiscriminatorConfig(in_ch=1, ndf=16, n_layers=2)),  # 22 px patches
    ema_decay=None,
    num_threads=1,
    log_every=25,
    ckpt_every=200,
)
