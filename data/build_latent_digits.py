"""Pixel vs latent diffusion on the digits under equal wall-clock budgets (lesson 07, LDM Fig. 6).

One class-conditional UNet (the same architecture for every model; only the input channels
and size differ) is trained on 32 x 32 digits in pixel space (f = 1) and on the latents of
lesson 04's frozen digit autoencoders at f = 2, 4, 8 (data/checkpoints/ae_digits_f{f}.pt:
16 x 16 x 4, 8 x 8 x 4, 4 x 4 x 4), each for the same wall-clock budget, with
`minildm.train.train_denoiser` (10% condition dropout for classifier-free guidance, bf16,
EMA, one CPU thread, seed 0). Time is this process's CPU time (`time.process_time`): on one
thread it is the wall-clock of an idle machine, and unlike the wall-clock it is not inflated
when other jobs share the CPU, so the budgets stay equal on a busy machine. The EMA weights are snapshotted at 1/8, 2/8, ..., 8/8 of the
budget; after training, each snapshot's FID (of its float16-rounded weights, as shipped) is
measured on 500 samples (50 per class, DDIM 25 steps, guidance scale 1) against the 500 test
digits with `minildm.metrics.fid`.
Encoding the 4,500 training digits to latents is done once beforehand (`cached_latents`) and
is not part of the budget (the first stage is trained once and shared, as in LDM); its time
is logged.

    python data/build_latent_digits.py --seconds 150        # lesson 07's shipped runs (~15 min)

writes data/checkpoints/ldm_digits_f{1,4}.pt (the final EMA weights of the pixel and f = 4
models) and data/checkpoints/ldm_digits_curves.json (every model's FID-vs-time curve).
benchmarks/bench_latent_vs_pixel.py runs the same `run_model` at a larger budget.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minildm.autoencoder import load_autoencoder, measure_scale_factor
from minildm.data import batches, load_digits
from minildm.ema import EMA
from minildm.features import cache_dir
from minildm.latent import LatentDiffusion, cached_latents, save_ldm
from minildm.metrics import fid
from minildm.schedules import cosine_schedule
from minildm.train import train_denoiser
from minildm.unet import UNet, UNetConfig

OUT = Path(__file__).resolve().parent / "checkpoints"
T, PREDICTION, BATCH, LR, EMA_DECAY, P_UNCOND = 1000, "v", 64, 2e-3, 0.995, 0.1
SNAPSHOTS, N_FID, FID_STEPS = 8, 500, 25


def unet_config(f: int) -> UNetConfig:
    """The same UNet at every f: 3 levels (1, 2, 2) x 24 channels, attention at the lowest."""
    size, ch_in = 32 // f, (1 if f == 1 else 4)
    return UNetConfig(in_ch=ch_in, out_ch=ch_in, ch=24, ch_mult=(1, 2, 2), num_res_blocks=1,
                      attn_resolutions=(max(size // 4, 1),), heads=2, groups=8, num_classes=10, image_size=size)


def first_stage(f: int):
    """(autoencoder or None, its file name, scale factor) for factor f; the factor is measured
    on the training digits (`measure_scale_factor`; the lesson-04 files store 1.0)."""
    if f == 1:
        return None, None, 1.0
    name = f"ae_digits_f{f}.pt"
    ae, _ = load_autoencoder(OUT / name)
    x, _ = load_digits("train", size=32)
    scale = measure_scale_factor(ae, x, generator=torch.Generator().manual_seed(0))
    return ae, name, scale


@torch.no_grad()
def sample_fid(ldm: LatentDiffusion, x_test: torch.Tensor, seed: int = 0) -> float:
    """FID of N_FID samples (N_FID / 10 per class, DDIM FID_STEPS steps, guidance 1) against x_test."""
    labels = torch.arange(10).repeat_interleave(N_FID // 10)
    x = torch.cat([ldm.sample(lb, image_size=32, steps=FID_STEPS, generator=torch.Generator().manual_seed(seed + i))
                   for i, lb in enumerate(labels.split(250))])
    return fid(x_test, x)


def run_model(f: int, seconds: float, snapshots: int = SNAPSHOTS) -> tuple[LatentDiffusion, dict]:
    """Train the f model for `seconds`, then measure FID at every snapshot. Returns (ldm with
    the final EMA weights, log)."""
    torch.manual_seed(0)
    ae, ae_name, scale = first_stage(f)
    x, y = load_digits("train", size=32)  # (4500, 1, 32, 32)
    t0 = time.perf_counter()
    z = x if ae is None else cached_latents(ae, x, cache_dir() / f"latents_digits_f{f}.pt")
    encode_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    unet = UNet(unet_config(f))
    ldm = LatentDiffusion(ae, unet, cosine_schedule(T), PREDICTION)
    ema = EMA(unet, decay=EMA_DECAY, warmup=True)
    marks = [seconds * (k + 1) / snapshots for k in range(snapshots)]
    saved: list[tuple[float, int, dict]] = []  # (seconds, steps, EMA weights)

    def on_step(step: int, elapsed: float) -> None:
        if len(saved) < snapshots - 1 and elapsed >= marks[len(saved)]:
            saved.append((elapsed, step + 1, {k: v.clone() for k, v in ema.params.items()}))

    log = train_denoiser(unet, batches(z, y, batch_size=BATCH, seed=0), ldm.schedule, 10**9, lr=LR,
                         prediction=PREDICTION, bf16=True, ema=ema, max_seconds=seconds,
                         cond_dropout=P_UNCOND, null_cond=torch.tensor(10), on_step=on_step,
                         clock=time.process_time, generator=torch.Generator().manual_seed(0))
    saved.append((log.seconds, len(log.losses), {k: v.clone() for k, v in ema.params.items()}))
    x_test, _ = load_digits("test", size=32)
    curve = []
    t_eval = time.perf_counter()
    for sec, steps, params in saved:
        with torch.no_grad():
            for name, p in unet.named_parameters():  # float16-rounded: what a shipped file holds
                p.copy_(params[name].half().float())
        curve.append({"seconds": round(sec, 2), "steps": steps, "fid": sample_fid(ldm, x_test)})
        print(f"  f={f}: {steps:5d} steps, {sec:6.1f} s, FID {curve[-1]['fid']:.2f}", flush=True)
    entry = {"f": f, "first_stage": ae_name, "scale_factor": scale, "params": sum(p.numel() for p in unet.parameters()),
             "unet_config": asdict(unet_config(f)), "steps": len(log.losses), "seconds": round(log.seconds, 2),
             "images_per_s": len(log.losses) * BATCH / log.seconds, "encode_seconds": round(encode_seconds, 2),
             "eval_seconds": round(time.perf_counter() - t_eval, 1), "curve": curve, "final_fid": curve[-1]["fid"],
             "losses_every_10": log.losses[::10]}
    return ldm, entry


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds at which the curve first reaches FID <= target, interpolated linearly
    between snapshots (None if never)."""
    prev = None
    for point in curve:
        if point["fid"] <= target:
            if prev is None:
                return point["seconds"]
            frac = (prev["fid"] - target) / (prev["fid"] - point["fid"])
            return prev["seconds"] + frac * (point["seconds"] - prev["seconds"])
        prev = point
    return None


def settings() -> dict:
    return {"T": T, "prediction": PREDICTION, "batch": BATCH, "lr": LR, "ema_decay": EMA_DECAY, "p_uncond": P_UNCOND,
            "clock": "time.process_time (CPU seconds, one thread)", "snapshots": SNAPSHOTS, "n_fid": N_FID, "fid_sampler": f"DDIM {FID_STEPS} steps, guidance 1",
            "torch": str(torch.__version__)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0, help="wall-clock training budget per model")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8], choices=[1, 2, 4, 8])
    parser.add_argument("--save", type=int, nargs="*", default=[1, 4], help="factors whose final weights to ship")
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = {"settings": {**settings(), "seconds_per_model": args.seconds}, "models": {}}
    for f in args.factors:
        ldm, entry = run_model(f, args.seconds)
        log["models"][str(f)] = entry
        if f in args.save:
            save_ldm(ldm, OUT / f"ldm_digits_f{f}.pt", entry["first_stage"], scale_factor=entry["scale_factor"],
                     steps=entry["steps"], seconds=entry["seconds"], final_fid=entry["final_fid"],
                     n_fid=N_FID, fid_steps=FID_STEPS)
        (OUT / "ldm_digits_curves.json").write_text(json.dumps(log, indent=1))
        print(f"f={f}: {entry['steps']} steps in {entry['seconds']:.0f} s ({entry['images_per_s']:.0f} images/s), "
              f"final FID {entry['final_fid']:.2f}", flush=True)


if __name__ == "__main__":
    main()
