"""Measure the GPU recipes (configs/gpu_*.py): images/s and peak memory over a few hundred steps.

    python benchmarks/gpu_recipes.py --steps 300 --out /tmp/gpu_recipes     # on a GPU machine

Makes a folder of procedural shapes at 64 and 256 px (no download), trains each recipe for
--steps steps into --out (stage 2 on the stage-1 run just made), and prints one JSON line
per recipe: median images/s and peak memory (MB) of the logged steps after the first 20%,
the device name, bf16 on. Nothing here is a quality measurement (a few hundred steps).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from minildm.data import make_shapes

ROOT = Path(__file__).resolve().parents[1]


def shapes_folder(path: Path, size: int, n: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if len(list(path.glob("*.png"))) < n:
        x = make_shapes(n, seed=0, size=size).images  # (n, 3, size, size) in [-1, 1]
        for i, img in enumerate(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path / f"{i:05d}.png")
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--out", default="/tmp/gpu_recipes")
    p.add_argument("--extra", default="", help="more overrides for every run, e.g. --extra=\"--data.batch_size=8\"")
    args = p.parse_args()
    out = Path(args.out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for size, f in ((64, 4), (256, 8)):
        folder = shapes_folder(out / f"shapes{size}", size, args.images)
        for stage in ("kl", "ldm"):
            name = f"gpu_folder{size}_{stage}_f{f}"
            run_dir = out / name
            extra = [f"--first_stage={out / f'gpu_folder{size}_kl_f{f}'}"] if stage == "ldm" else []
            cmd = [sys.executable, "-m", "minildm", "train", str(ROOT / "configs" / f"{name}.py"),
                   f"--data.path={folder}", f"--run_dir={run_dir}", f"--steps={args.steps}",
                   f"--ckpt_every={args.steps}", f"--sample_every={args.steps}", "--log_every=10",
                   "--progress=false", "--resume", *extra, *args.extra.split()]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(json.dumps({"recipe": name, "error": done.stderr.strip().splitlines()[-1:]}))
                continue
            log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
            tail = log[len(log) // 5:] or log
            print(json.dumps({"recipe": name, "device": device, "steps": args.steps,
                              "images_per_s": round(statistics.median(r["images_per_s"] for r in tail), 1),
                              "peak_mem_mb": round(max(r["peak_mem_mb"] for r in log)),
                              "sample_grid": str(sorted((run_dir / "samples").glob("*.png"))[-1])}), flush=True)


if __name__ == "__main__":
    main()
