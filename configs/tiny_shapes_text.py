"""Text-to-image latent diffusion on the procedural shapes ("a big red star in the middle"):
captions are tokenized (`minildm.text.Tokenizer`) and read by a small transformer text
encoder trained jointly with the UNet, whose cross-attention layers attend to its tokens
(LDM Sec. 3.3, Eq. 3). The first stage is lesson 07's shipped KL f=4 autoencoder of the
shapes (data/checkpoints/ae_shapes_f4.pt: 32x32x3 -> 8x8x4). A toy: in a few minutes the
samples get colours and rough places right more often than shapes.

    python -m minildm train configs/tiny_shapes_text.py
    python -m minildm sample runs/tiny_shapes_text --prompt "a big red circle in the middle" --guidance 3
"""

from minildm.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig
from minildm.data import DATA_DIR
from minildm.text import TextEncoderConfig
from minildm.unet import UNetConfig

config = TrainConfig(
    stage="diffusion",
    steps=800,
    run_dir="runs/tiny_shapes_text",
    first_stage=str(DATA_DIR / "checkpoints" / "ae_shapes_f4.pt"),  # f=4: 32x32x3 -> 8x8x4
    data=DataConfig(source="shapes", image_size=32, batch_size=64, shapes_count=10_000),
    optim=OptimConfig(lr=2e-3, warmup_steps=50, grad_clip=1.0),
    unet=UNetConfig(in_ch=4, out_ch=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8, 4),
                    heads=2, groups=8, image_size=8, context_dim=32),
    text=TextEncoderConfig(max_len=10, dim=32, depth=1, heads=2),
    diffusion=DiffusionConfig(schedule="cosine", T=200, prediction="v", cond_drop=0.1),
    guidance=3.0,
    ema_decay=0.995,
    num_threads=1,
    log_every=25,
    ckpt_every=200,
    n_samples=16,
    sample_steps=50,
)
