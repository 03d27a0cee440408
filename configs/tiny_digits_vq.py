"""A VQ first stage on the shipped digits (LDM's VQ-regularised autoencoder, VQGAN's layout):
f = 4, 28 -> 7x7 positions, each one of 64 codes of dimension 4, with EMA codebook updates
and dead-code restarts (lesson 05). About a minute on a laptop CPU.

    python -m minildm train configs/tiny_digits_vq.py
    python -m minildm evaluate runs/tiny_digits_vq                  # PSNR / SSIM, held-out digits
    python -m minildm train configs/tiny_digits_ldm.py --first_stage=runs/tiny_digits_vq \\
        --run_dir=runs/ldm_on_vq                                    # diffusion on its z_e (4 channels)
"""

from minildm.autoencoder import AutoencoderConfig
from minildm.config import DataConfig, OptimConfig, TrainConfig
from minildm.firststage import FirstStageLoss
from minildm.quantize import QuantizerConfig

config = TrainConfig(
    stage="autoencoder",
    steps=400,
    run_dir="runs/tiny_digits_vq",
    data=DataConfig(source="digits", image_size=28, batch_size=32),
    optim=OptimConfig(lr=2e-3, betas=(0.5, 0.9), warmup_steps=20, grad_clip=None),
    autoencoder=AutoencoderConfig(in_ch=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_ch=4,
                                  groups=8, attn_mid=False),
    quantizer=QuantizerConfig(num_codes=64, dim=4, ema=True, restart_dead=True),
    loss=FirstStageLoss(reconstruction="l1", vq_weight=1.0),
    ema_decay=None,
    num_threads=1,
    log_every=25,
    ckpt_every=200,
)
