"""LDM's full first-stage objective on RGB images, at toy scale: a small KL autoencoder
(f = 4, 32x32x3 -> 8x8x4) of the procedural shapes trained with L1 + the perceptual
distance (the project's own perceptual net, data/perceptual_net.pt) under a learned
log-variance, a 1e-6 KL, and from step 200 a patch discriminator weighted adaptively
(VQGAN Eq. 7). Every term is logged: `python -m minildm plot runs/tiny_shapes_kl`.

    python -m minildm train configs/tiny_shapes_kl.py
    python -m minildm evaluate runs/tiny_shapes_kl                  # PSNR / SSIM, held-out shapes
"""

from minildm.autoencoder import AutoencoderConfig
from minildm.config import DataConfig, OptimConfig, TrainConfig
from minildm.firststage import FirstStageLoss
from minildm.losses import PatchDiscriminatorConfig

config = TrainConfig(
    stage="autoencoder",
    steps=300,
    run_dir="runs/tiny_shapes_kl",
    data=DataConfig(source="shapes", image_size=32, batch_size=32, shapes_count=5_000),
    optim=OptimConfig(lr=2e-3, betas=(0.5, 0.9), warmup_steps=20, grad_clip=None),
    autoencoder=AutoencoderConfig(in_ch=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_ch=4,
                                  groups=8, attn_mid=False),
    loss=FirstStageLoss(reconstruction="l1", kl_weight=1e-6, perceptual_weight=1.0, learn_logvar=True,
                        disc_weight=0.5, disc_start=200,
                        discriminator=PatchDiscriminatorConfig(in_ch=3, ndf=16, n_layers=2)),
    ema_decay=None,
    num_threads=1,
    log_every=25,
    ckpt_every=100,
    sample_every=100,
)
