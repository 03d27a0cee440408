"""Pixel vs latent diffusion at equal wall-clock: LDM's Fig. 6 claim at toy scale, larger budget.

Runs `run_model` of data/build_latent_digits.py (the code that made lesson 07's shipped runs)
for pixel space (f = 1) and the latents of lesson 04's digit autoencoders (f = 2, 4, 8), each
for the same wall-clock budget, and prints a table of (model, f, wall-clock, images per
second, final FID) and, for each latent model, the training time it took to reach the pixel
model's final FID and the speed-up (pixel time / that time). Goal (issue 7): latent f = 4
reaches the pixel model's FID in at most a quarter of its wall-clock. Time is the training
process's CPU time (`time.process_time`, one thread), which equals the wall-clock of the same run
on an idle machine and is not inflated by other jobs on a shared one; a time is interpolated
between the 8 FID snapshots (or, if the first snapshot already reaches the target, is that
snapshot's time: an upper bound).

    python benchmarks/bench_latent_vs_pixel.py --seconds 300     # ~30 CPU-minutes on one thread
    python benchmarks/bench_latent_vs_pixel.py --seconds 30 --factors 1 4   # a quick look

Rombach et al. (2022) show in Fig. 6 (Sec. 4.1, class-conditional ImageNet) that LDM-4 to -16
learn much faster than the pixel-based LDM-1 (an FID gap of 38 between LDM-1 and LDM-8 after
2M steps), and in their inpainting comparison (Sec. 4.5) that LDM-4 trains at least 2.7x
faster than LDM-1 with at least 1.6x better FID; this is a 32 x 32 digit toy on a CPU, so only
the direction of the effect is comparable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _build_module():
    """data/build_latent_digits.py, imported by path (data/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_latent_digits", ROOT / "data" / "build_latent_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="training budget per model, CPU seconds")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8], choices=[1, 2, 4, 8])
    parser.add_argument("--json", type=Path, default=None, help="also write the full log here")
    args = parser.parse_args()
    if args.factors[0] != 1:
        raise SystemExit("--factors must start with 1: the pixel model sets the FID to reach")
    torch.set_num_threads(1)
    build = _build_module()
    models = {}
    for f in args.factors:
        _, models[f] = build.run_model(f, args.seconds)
    pixel = models[1]
    target, pixel_seconds = pixel["final_fid"], pixel["seconds"]
    print(f"\nbudget {args.seconds:.0f} s per model; FID of {build.N_FID} samples vs the 500 test digits "
          f"({build.FID_STEPS} DDIM steps, guidance 1)")
    print(f"{'model':8s} {'f':>2s} {'train CPU-s':>12s} {'steps':>6s} {'images/s':>9s} {'FID':>7s} "
          f"{'s to pixel FID':>15s} {'speed-up':>9s}")
    for f, m in models.items():
        reach = build.time_to_reach(m["curve"], target)
        speedup = "" if reach is None else f"{pixel_seconds / reach:8.1f}x"
        reach_s = "never" if reach is None else f"{reach:.0f}"
        name = "pixel" if f == 1 else "latent"
        print(f"{name:8s} {f:2d} {m['seconds']:12.0f} {m['steps']:6d} {m['images_per_s']:9.0f} {m['final_fid']:7.2f} "
              f"{reach_s:>15s} {speedup:>9s}")
        m["seconds_to_pixel_fid"], m["speedup_to_pixel_fid"] = reach, None if reach is None else pixel_seconds / reach
    if 4 in models and models[4]["seconds_to_pixel_fid"] is not None:
        ok = models[4]["seconds_to_pixel_fid"] <= pixel_seconds / 4
        print(f"goal (f=4 reaches the pixel FID in <= 1/4 of its training time): {'met' if ok else 'missed'}")
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": {**build.settings(), "seconds_per_model": args.seconds},
                                         "models": {str(f): m for f, m in models.items()}}, indent=1))


if __name__ == "__main__":
    main()
