"""Train the pixel-space DDPM on digits that lesson 03 samples from, and write
data/digits_unet.pt (EMA weights in float16, the config, the loss curve).

    python data/build_digits_unet.py --seconds 1500

It trains for a wall-clock budget (one CPU thread), so that data/build_digits_mlp.py, started
at the same time with the same budget, gives the MLP of lesson 03 the same time; the number
of steps reached is stored in the file. Everything is seeded. The model predicts v
(Salimans & Ho 2022) on a cosine schedule of 100 steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from minildm.data import batches, load_digits
from minildm.ema import EMA
from minildm.schedules import cosine_schedule
from minildm.train import train_denoiser
from minildm.unet import UNet, UNetConfig

CONFIG = UNetConfig(in_ch=1, out_ch=1, ch=24, ch_mult=(1, 2, 2), num_res_blocks=1,
                    attn_resolutions=(7,), heads=2, image_size=28)
T, PREDICTION, BATCH, LR, EMA_DECAY = 100, "v", 64, 2e-3, 0.995
OUT = Path(__file__).resolve().parent / "digits_unet.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock training budget")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits, _ = load_digits("train")  # (4500, 1, 28, 28)
    model = UNet(CONFIG)
    ema = EMA(model, decay=EMA_DECAY)
    log = train_denoiser(model, batches(digits, batch_size=BATCH, seed=0), cosine_schedule(T), 10**9, lr=LR,
                         prediction=PREDICTION, bf16=True, ema=ema, max_seconds=args.seconds,
                         generator=torch.Generator().manual_seed(0))
    ema.copy_to(model)
    checkpoint = {
        "config": asdict(CONFIG),
        "schedule": {"kind": "cosine", "T": T},
        "prediction": PREDICTION,
        "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
        "losses": torch.tensor(log.losses),  # (steps,) float32
        "train": {"steps": len(log.losses), "batch": BATCH, "lr": LR, "ema_decay": EMA_DECAY, "bf16": True,
                  "seconds": log.seconds, "torch": str(torch.__version__)},
    }
    with tempfile.NamedTemporaryFile(dir=OUT.parent, suffix=".tmp", delete=False) as f:  # atomic write
        torch.save(checkpoint, f)
    os.replace(f.name, OUT)
    print(f"wrote {OUT}: {len(log.losses)} steps in {log.seconds:.0f} s")


if __name__ == "__main__":
    main()
