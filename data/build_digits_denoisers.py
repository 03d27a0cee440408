"""Train the two digit denoisers that lesson 03 compares, for a wall-clock budget, and write
data/digits_unet.pt or data/digits_mlp.pt (EMA weights in float16, the config, the loss of
every step, the training facts; read with `torch.load(path, weights_only=True)`).

    python data/build_digits_denoisers.py --model unet --seconds 1500 &
    python data/build_digits_denoisers.py --model mlp --seconds 1500

Start both at the same time (one CPU thread each), so both get the same machine for the same
time: lesson 03 compares them at equal wall-clock. Same data, schedule (cosine, T = 100),
prediction (v, Salimans & Ho 2022), batch, learning rate and EMA; similar parameter counts
(627,433 and 675,600). The number of steps each reached is stored in its file.
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
from minildm.mlp import MLPConfig, MLPDenoiser
from minildm.schedules import cosine_schedule
from minildm.train import train_denoiser
from minildm.unet import UNet, UNetConfig

CONFIGS = {
    "unet": UNetConfig(in_ch=1, out_ch=1, ch=24, ch_mult=(1, 2, 2), num_res_blocks=1,
                       attn_resolutions=(7,), heads=2, image_size=28),
    "mlp": MLPConfig(dim=28 * 28, hidden=256, depth=3),
}
T, PREDICTION, BATCH, LR, EMA_DECAY = 100, "v", 64, 2e-3, 0.995


def main() -> None:
    parser = argparse.ArgumentParser(description="Train one of lesson 03's digit denoisers for a wall-clock budget.")
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock training budget")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = CONFIGS[args.model]
    model = UNet(config) if args.model == "unet" else MLPDenoiser(config)
    digits, _ = load_digits("train")  # (4500, 1, 28, 28)
    ema = EMA(model, decay=EMA_DECAY)
    log = train_denoiser(model, batches(digits, batch_size=BATCH, seed=0), cosine_schedule(T), 10**9, lr=LR,
                         prediction=PREDICTION, bf16=True, ema=ema, max_seconds=args.seconds,
                         generator=torch.Generator().manual_seed(0))
    ema.copy_to(model)
    checkpoint = {
        "config": asdict(config),
        "schedule": {"kind": "cosine", "T": T},
        "prediction": PREDICTION,
        "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
        "losses": torch.tensor(log.losses),  # (steps,) float32
        "train": {"steps": len(log.losses), "batch": BATCH, "lr": LR, "ema_decay": EMA_DECAY, "bf16": True,
                  "seconds": log.seconds, "torch": str(torch.__version__)},
    }
    out = Path(__file__).resolve().parent / f"digits_{args.model}.pt"
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".tmp", delete=False) as f:  # atomic write
        torch.save(checkpoint, f)
    os.replace(f.name, out)
    print(f"wrote {out}: {len(log.losses)} steps in {log.seconds:.0f} s")


if __name__ == "__main__":
    main()
