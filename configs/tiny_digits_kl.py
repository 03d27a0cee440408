"""The first stage on the shipped digits: a small KL autoencoder (f = 4, 28 -> 7x7x2 latents)
that trains on a laptop CPU in under two minutes. For a VQ model add a quantizer:

    python -m minildm train configs/tiny_digits_kl.py
    python -m minildm train configs/tiny_digits_kl.py --quantizer.num_codes=64 --quantizer.dim=2 \
        --run_dir=runs/tiny_digits_vq
    python -m minildm evaluate runs/tiny_digits_kl
"""

from minildm.autoencoder import AutoencoderConfig
from minildm.config import DataConfig, OptimConfig, TrainConfig
from minildm.firststage import FirstStageLoss

config = TrainConfig(
    stage="autoencoder",
    steps=400,
    run_dir="runs/tiny_digits_kl",
    data=DataConfig(source="digits", image_size=28, batch_size=32),
    optim=OptimConfig(lr=2e-3, betas=(0.5, 0.9), warmup_steps=20, grad_clip=None),
    autoencoder=AutoencoderConfig(in_ch=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_ch=2,
                                  groups=8, attn_mid=False),
    loss=FirstStageLoss(reconstruction="l1", kl_weight=1e-6),
    ema_decay=None,
    num_threads=1,
    log_every=25,
    ckpt_every=200,
)
