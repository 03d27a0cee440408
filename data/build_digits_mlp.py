"""Train the MLP denoiser that lesson 03 compares with the UNet of data/digits_unet.pt, for
the same wall-clock time, and write data/digits_mlp.pt (EMA weights in float16).

    python data/build_digits_mlp.py --seconds 1500

Run it beside `python data/build_digits_unet.py --seconds 1500` (both on one thread, started
together), so both get the same machine for the same time. Same data, schedule, prediction, batch size, learning rate and EMA as
the UNet; a similar parameter count (675,600 against 627,433). The number of steps it
reached is stored in the file.
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

CONFIG = MLPConfig(dim=28 * 28, hidden=256, depth=3)
T, PREDICTION, BATCH, LR, EMA_DECAY = 100, "v", 64, 2e-3, 0.995
OUT = Path(__file__).resolve().parent / "digits_mlp.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock training budget")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits, _ = load_digits("train")
    model = MLPDenoiser(CONFIG)
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
