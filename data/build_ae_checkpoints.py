"""Build the small autoencoder checkpoints of lesson 04 (data/checkpoints/ae_*.pt).

Lesson 04 compares 13 KL autoencoders; training them all would take the lesson far past
its few minutes on a CPU, so they are trained here, once, with minildm's own code:

    python data/build_ae_checkpoints.py                 # all 13 (about an hour on one CPU thread)
    python data/build_ae_checkpoints.py --only digits_f4 photos_f4_flat

Every model: width ch=16 at every level, one ResBlock per level (two in the decoder), z_ch=4
latent channels, middle attention when f >= 4 (at f = 1, 2 it would attend over 1,024 or
256 positions), trained with `minildm.firststage.train_first_stage` for 1,500 steps of 16
images of 32 x 32 px, L1 + kl_weight * KL, Adam lr 2e-3, bf16 autocast, one CPU thread,
seed 0. Weights are stored as float16 (`save_autoencoder(half=True)`); the PSNR / SSIM in
each file's meta were measured after that rounding, on the test images the lesson uses:

    photos_f{1,2,4,8}       photo crops (train: photo_crops(16000, seed=0)), kl_weight 1e-6
    digits_f{1,2,4,8}       MNIST digits padded to 32 px (load_digits("train", 32)), kl 1e-6
    digits_f4_kl{0,1e-04,1e-02,1}   the KL-weight sweep (with digits_f4 as 1e-6)
    photos_f4_flat          photos_f4 with a flattened 1-D bottleneck of the same size
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minildm.autoencoder import (AutoencoderConfig, AutoencoderKL, FlatAutoencoderKL,
                                 load_autoencoder, save_autoencoder)
from minildm.data import batches, load_digits, photo_crops
from minildm.firststage import FirstStageLoss, train_first_stage
from minildm.metrics import psnr, ssim

OUT = Path(__file__).resolve().parent / "checkpoints"
LEVELS = {1: 1, 2: 2, 4: 3, 8: 4}  # f -> len(ch_mult)


def config_for(in_ch: int, f: int) -> AutoencoderConfig:
    return AutoencoderConfig(in_ch=in_ch, ch=16, ch_mult=(1,) * LEVELS[f], num_res_blocks=1,
                             z_ch=4, groups=4, attn_mid=f >= 4)


def datasets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) images for each dataset; the test sets are the ones the lesson uses."""
    return {"photos": (photo_crops(16000, size=32, seed=0), photo_crops(512, size=32, seed=1)),
            "digits": (load_digits("train", size=32)[0], load_digits("test", size=32)[0])}


def specs() -> dict[str, tuple[str, int, float, bool]]:
    """name -> (dataset, f, kl_weight, flat)."""
    out = {}
    for data in ("photos", "digits"):
        for f in (1, 2, 4, 8):
            out[f"{data}_f{f}"] = (data, f, 1e-6, False)
    for w in (0.0, 1e-4, 1e-2, 1.0):
        out[f"digits_f4_kl{w:g}"] = ("digits", 4, w, False)
    out["photos_f4_flat"] = ("photos", 4, 1e-6, True)
    return out


@torch.no_grad()
def evaluate(model: AutoencoderKL, test: torch.Tensor) -> dict[str, float]:
    """PSNR / SSIM (dB, mean over images) of the posterior-mean reconstructions, clamped to [-1, 1]."""
    x_rec = model.decode(model.encode(test).mode()).clamp(-1, 1)
    return {"psnr": psnr(x_rec, test).mean().item(), "ssim": ssim(x_rec, test).mean().item()}


def build(name: str, steps: int, data: dict, out: Path = OUT) -> None:
    dataset, f, kl_weight, flat = specs()[name]
    train, test = data[dataset]
    torch.manual_seed(0)
    cfg = config_for(train.shape[1], f)
    model = FlatAutoencoderKL(cfg, train.shape[-1]) if flat else AutoencoderKL(cfg)
    log = train_first_stage(model, batches(train, batch_size=16, seed=0), steps,
                            FirstStageLoss(reconstruction="l1", kl_weight=kl_weight), lr=2e-3,
                            bf16=True, generator=torch.Generator().manual_seed(0))
    meta = {"dataset": dataset, "kl_weight": kl_weight, "steps": steps, "batch_size": 16, "lr": 2e-3,
            "seconds": round(log.seconds, 1),
            "log_every_10": {k: v[::10] for k, v in log.terms.items()}}
    path = out / f"ae_{name}.pt"
    if flat:  # not a minildm class: store the same fields by hand
        state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.float() for k, v in state.items()})
        meta.update(evaluate(model.eval(), test))
        torch.save({"kind": "flat", "config": vars(cfg), "image_size": train.shape[-1],
                    "state_dict": state, "meta": meta}, path)
    else:
        save_autoencoder(model, path, half=True)
        model, _ = load_autoencoder(path)  # measure what the file holds: float16-rounded weights
        meta.update(evaluate(model, test))
        save_autoencoder(model, path, half=True, **meta)
    print(f"{name}: {steps} steps in {log.seconds:.0f} s, test PSNR {meta['psnr']:.2f} dB, "
          f"SSIM {meta['ssim']:.3f}, {path.stat().st_size / 1e3:.0f} kB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(specs()), help="build only these")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the files")
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible, and faster than 2 threads for these tiny models
    args.out.mkdir(exist_ok=True)
    data = datasets()
    start = time.perf_counter()
    for name in args.only or specs():
        build(name, args.steps, data, args.out)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
