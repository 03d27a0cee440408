"""Train the small first-stage models of lesson 05 (vector quantization) and save them to
data/checkpoints/vq_*.pt with their training logs.

    python data/build_vq_checkpoints.py            # all of them (about 25 min on one busy CPU core)
    python data/build_vq_checkpoints.py vq_plain   # only the ones named

Every model is a digit autoencoder with f = 4 (32 x 32 digits -> 8 x 8 latents of 4 channels),
trained by `minildm.firststage.train_first_stage` for 600 steps of batch 64 on the 4,500
training digits (L1 reconstruction, Adam lr 2e-3, bf16 autocast, one CPU thread, seed 0):

    vq_plain, vq_ema, vq_restart   512 codes: gradient codebook / EMA codebook / EMA + restart
                                   of codes unused for 20 steps (vq_restart is also K = 512
                                   of the codebook-size sweep)
    vq_k2, vq_k8, vq_k32, vq_k128  the codebook-size sweep, EMA + restart like vq_restart
    vq_kl                          the KL autoencoder (KL weight 1e-6) at the same f, for comparison

Weights are stored as float16 (`save_autoencoder(half=True)`); each file's `meta` holds the
command's settings and the per-step log ("usage": fraction of the codes used by the batch,
"usage_20": used in the last 20 steps, "perplexity", "rec", as float32 tensors).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from minildm.autoencoder import (AutoencoderConfig, AutoencoderKL, VQAutoencoder, VQAutoencoderConfig,
                                 save_autoencoder)
from minildm.course import seed_everything
from minildm.data import batches, load_digits
from minildm.firststage import FirstStageLoss, train_first_stage
from minildm.quantize import QuantizerConfig

OUT = Path(__file__).resolve().parent / "checkpoints"
STEPS, BATCH, LR, SEED = 600, 64, 2e-3, 0
ARCH = dict(in_ch=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_ch=4, groups=4, attn_mid=False)  # f = 4
DEAD_AFTER = 20

RUNS = {  # name -> quantizer settings (None: the KL autoencoder)
    "vq_plain": QuantizerConfig(num_codes=512, dim=4),
    "vq_ema": QuantizerConfig(num_codes=512, dim=4, ema=True),
    "vq_restart": QuantizerConfig(num_codes=512, dim=4, ema=True, restart_dead=True, dead_after=DEAD_AFTER),
    **{f"vq_k{k}": QuantizerConfig(num_codes=k, dim=4, ema=True, restart_dead=True, dead_after=DEAD_AFTER)
       for k in (2, 8, 32, 128)},
    "vq_kl": None,
}


def build(name: str) -> None:
    torch.set_num_threads(1)
    seed_everything(SEED)
    qcfg = RUNS[name]
    if qcfg is None:
        model = AutoencoderKL(AutoencoderConfig(**ARCH))
        after_step = None
    else:
        model = VQAutoencoder(VQAutoencoderConfig(**ARCH, quantizer=qcfg))
        q = model.quantizer
        after_step = lambda step, x, x_rec: {"usage": q.usage_fraction(window=1),  # noqa: E731
                                              "usage_20": q.usage_fraction(window=DEAD_AFTER)}
    x, _ = load_digits("train", size=32)
    log = train_first_stage(model, batches(x, batch_size=BATCH, seed=SEED), STEPS, FirstStageLoss(kl_weight=1e-6),
                            lr=LR, bf16=True, after_step=after_step,
                            generator=torch.Generator().manual_seed(SEED))
    keep = ("usage", "usage_20", "perplexity", "rec", "kl")
    meta = {"command": f"python data/build_vq_checkpoints.py {name}", "steps": STEPS, "batch_size": BATCH,
            "lr": LR, "seed": SEED, "seconds": round(log.seconds, 1), "torch": str(torch.__version__),
            "log": {k: torch.tensor(v, dtype=torch.float32) for k, v in log.terms.items() if k in keep}}
    OUT.mkdir(exist_ok=True)
    save_autoencoder(model, OUT / f"{name}.pt", half=True, **meta)
    print(f"{name}: {log.seconds:.0f} s, final rec {log.terms['rec'][-1]:.4f}", flush=True)


if __name__ == "__main__":
    names = sys.argv[1:] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    start = time.perf_counter()
    for n in names:
        build(n)
    print(f"all done in {time.perf_counter() - start:.0f} s")
