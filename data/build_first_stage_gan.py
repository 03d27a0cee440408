"""Build the three autoencoders of lesson 06 (data/checkpoints/gan_{a,b,c}.pt).

    python data/build_first_stage_gan.py                # all three, one after the other
    python data/build_first_stage_gan.py --only c

The same KL autoencoder (lesson 04's photos_f4: ch=16 at 3 levels, f = 4, z_ch = 4, middle
attention) is trained on the same photo crops (photo_crops(16000, size=32, seed=0)) with
`minildm.firststage.train_first_stage` three ways, 2,000 steps of 16 crops, Adam lr 2e-3
betas (0.5, 0.9), bf16 autocast, one CPU thread, seed 0, KL weight 1e-6:

    a   L1 only
    b   L1 + perceptual (perceptual_weight 1, the shipped data/perceptual_net.pt)
    c   L1 + perceptual + patch adversarial: hinge loss, disc_weight 0.5 times the adaptive
        weight, disc_start 500, PatchDiscriminator(ndf=64, n_layers=1): 16 x 16 px patches

Each file holds the float16 autoencoder (`save_autoencoder`), every logged term at every
step (float32 tensors in meta["log"]), the PSNR measured after the float16 rounding on the
lesson's held-out crops (photo_crops(512, size=32, seed=1)), and for c the discriminator.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, load_autoencoder, save_autoencoder
from minildm.data import batches, photo_crops
from minildm.firststage import FirstStageLoss, train_first_stage
from minildm.losses import PatchDiscriminator, PatchDiscriminatorConfig
from minildm.metrics import psnr
from minildm.perceptual import default_perceptual_distance

OUT = Path(__file__).resolve().parent / "checkpoints"
STEPS, BATCH, LR = 2000, 16, 2e-3
AE_CONFIG = AutoencoderConfig(in_ch=3, ch=16, ch_mult=(1, 1, 1), num_res_blocks=1, z_ch=4, groups=4, attn_mid=True)
DISC = PatchDiscriminatorConfig(in_ch=3, ndf=64, n_layers=1)
RUNS = {
    "a": FirstStageLoss(reconstruction="l1", kl_weight=1e-6),
    "b": FirstStageLoss(reconstruction="l1", kl_weight=1e-6, perceptual_weight=1.0),
    "c": FirstStageLoss(reconstruction="l1", kl_weight=1e-6, perceptual_weight=1.0, disc_weight=0.5,
                        disc_start=500, gan_loss="hinge", discriminator=DISC),
}


def train_run(name: str, steps: int = STEPS, train: torch.Tensor | None = None):
    """(model, discriminator or None, log) of run `name`, exactly as this script trains it
    (the lesson reruns the first steps of a run through this function and compares the log)."""
    config = RUNS[name]
    train = photo_crops(16000, size=32, seed=0) if train is None else train
    torch.manual_seed(0)
    model = AutoencoderKL(AE_CONFIG)
    disc = PatchDiscriminator(config.discriminator) if config.disc_weight > 0 else None
    perceptual = default_perceptual_distance() if config.perceptual_weight > 0 else None
    log = train_first_stage(model, batches(train, batch_size=BATCH, seed=0), steps, config, lr=LR, bf16=True,
                            perceptual=perceptual, discriminator=disc,
                            generator=torch.Generator().manual_seed(0))
    return model, disc, log


def build(name: str, steps: int, out: Path) -> None:
    model, disc, log = train_run(name, steps)
    path = out / f"gan_{name}.pt"
    save_autoencoder(model, path, half=True)
    model, _ = load_autoencoder(path)  # measure what the file holds
    test = photo_crops(512, size=32, seed=1)
    with torch.no_grad():
        x_rec = model.decode(model.encode(test).mode()).clamp(-1, 1)
    meta = {"run": name, "loss": asdict(RUNS[name]), "steps": steps, "batch_size": BATCH, "lr": LR,
            "seconds": round(log.seconds, 1), "psnr": psnr(x_rec, test).mean().item(),
            "log": {k: torch.tensor(v, dtype=torch.float32) for k, v in log.terms.items()}}
    if disc is not None:
        meta["discriminator"] = {k: v.half() if v.is_floating_point() else v for k, v in disc.state_dict().items()}
    save_autoencoder(model, path, half=True, **meta)
    print(f"{name}: {steps} steps in {log.seconds:.0f} s, held-out PSNR {meta['psnr']:.2f} dB, "
          f"{path.stat().st_size / 1e3:.0f} kB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="build only these")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(exist_ok=True)
    start = time.perf_counter()
    for name in args.only or RUNS:
        build(name, args.steps, args.out)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
