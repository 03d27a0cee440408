"""Build data/perceptual_net.pt, the default feature network of minildm.perceptual.

    python data/build_perceptual_net.py                                   # data/perceptual_net.pt
    python data/build_perceptual_net.py --seed 1 --out data/perceptual_net_seed1.pt

The second file is the same recipe with another seed: lesson 06 uses it for a reconstruction
FID on features that no autoencoder was trained against.

Trains `minildm.perceptual.PerceptualNet` with `train_perceptual_net(seed=0)` (one CPU
thread, seeded) to classify which of the 9 photos and which of the 5 zoom levels a 32 px
crop comes from, stores its weights as float16, and reports the accuracy on held-out
crops (`zoom_dataset(40, seed=1)`: other positions of the same photos, 1,800 crops).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minildm.data import DATA_DIR
from minildm.features import _save_atomic
from minildm.perceptual import (WEIGHTS_FILE, PerceptualNet, train_perceptual_net, zoom_accuracy,
                                zoom_dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA_DIR / WEIGHTS_FILE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    net = train_perceptual_net(seed=args.seed, verbose=True)
    seconds = time.perf_counter() - t0
    state = {k: v.half() for k, v in net.state_dict().items()}
    out = args.out
    _save_atomic(state, out)
    net = PerceptualNet()
    net.load_state_dict({k: v.float() for k, v in state.items()})  # measure what the file holds
    x, y = zoom_dataset(40, seed=1)
    acc, acc_photo = zoom_accuracy(net.eval(), x, y)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"trained in {seconds:.0f} s, {n_params} parameters; held-out accuracy (photo, zoom) {acc:.3f}, "
          f"photo alone {acc_photo:.3f} (chance 1/45, 1/9); wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
