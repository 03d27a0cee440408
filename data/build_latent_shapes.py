"""Build lesson 07's text-to-image model of the shapes (data/checkpoints/*shapes*.pt).

Three stages, each trained once here with minildm's own code on one CPU thread, seed 0:

    python data/build_latent_shapes.py --stage ae           # KL f=4 first stage, 32x32x3 -> 8x8x4
    python data/build_latent_shapes.py --stage classifier   # attribute classifier (prompt accuracy)
    python data/build_latent_shapes.py --stage ldm --seconds 600   # text encoder + latent UNet, jointly
    python data/build_latent_shapes.py --stage sweep        # guidance scale vs FID and prompt accuracy

ae:         `minildm.firststage.train_first_stage` on make_shapes(20000, seed=0), 4,000 steps of 32,
            L2 + 1e-6 KL (with L1 the small shape, a few % of the pixels, stayed an orange blob
            after 900 steps; L2 weighs its large colour errors more), writes
            data/checkpoints/ae_shapes_f4.pt (float16, with its measured scale factor).
classifier: `minildm.features.train_shapes_classifier` (3,000 steps) on make_shapes(20000, seed=100)
            and on their reconstructions by the ae stage's model (so run ae first), writes
            data/shapes_classifier.pt.
ldm:        latents of make_shapes(20000, seed=0) encoded once (`minildm.latent.encode_dataset`),
            then `minildm.train.train_denoiser` on the `TextConditionedUNet` (UNet + TextEncoder,
            one optimizer) with 10% condition dropout; writes data/checkpoints/ldm_shapes_text.pt.
sweep:      for each guidance scale, 500 samples (DDIM 25 steps) for the captions of
            make_shapes(500, seed=1000) (the test set), judged by the attribute classifier
            (prompt accuracy) and by an FID on the classifier's 128-d features against those
            500 test images; writes data/checkpoints/ldm_shapes_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minildm.autoencoder import (AutoencoderConfig, AutoencoderKL, load_autoencoder,
                                 measure_scale_factor, save_autoencoder)
from minildm.data import DATA_DIR, batches, make_shapes
from minildm.ema import EMA
from minildm.features import (SHAPES_WEIGHTS_FILE, cache_dir, load_shapes_classifier, predict_attributes,
                              prompt_accuracy, train_shapes_classifier)
from minildm.firststage import FirstStageLoss, train_first_stage
from minildm.latent import LatentDiffusion, cached_latents, load_ldm, save_ldm
from minildm.metrics import fid, psnr
from minildm.schedules import cosine_schedule
from minildm.text import TextConditionedUNet, TextEncoder, TextEncoderConfig, Tokenizer
from minildm.train import train_denoiser
from minildm.unet import UNet, UNetConfig

OUT = Path(__file__).resolve().parent / "checkpoints"
AE_PATH = OUT / "ae_shapes_f4.pt"
N_TRAIN, TRAIN_SEED, TEST_SEED = 20000, 0, 1000
AE_CONFIG = AutoencoderConfig(in_ch=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_ch=4, groups=8,
                              attn_mid=True, heads=1)
AE_STEPS = 4000


def build_ae() -> None:
    train = make_shapes(N_TRAIN, seed=TRAIN_SEED).images  # (20000, 3, 32, 32)
    test = make_shapes(500, seed=TEST_SEED).images
    torch.manual_seed(0)
    model = AutoencoderKL(AE_CONFIG)
    log = train_first_stage(model, batches(train, batch_size=32, seed=0), AE_STEPS,
                            FirstStageLoss(reconstruction="l2", kl_weight=1e-6), lr=2e-3, bf16=True,
                            generator=torch.Generator().manual_seed(0))
    save_autoencoder(model, AE_PATH, half=True)
    model, _ = load_autoencoder(AE_PATH)  # measure what the file holds: float16-rounded weights
    scale = measure_scale_factor(model, train[:2000], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rec = model.decode(model.encode(test).mode()).clamp(-1, 1)
    meta = {"dataset": f"make_shapes({N_TRAIN}, seed={TRAIN_SEED})", "reconstruction": "l2", "kl_weight": 1e-6,
            "steps": len(log.terms["loss"]), "batch_size": 32, "lr": 2e-3, "seconds": round(log.seconds, 1),
            "psnr": psnr(rec, test).mean().item(), "scale_factor": scale,
            "log_every_10": {k: v[::10] for k, v in log.terms.items()}}
    save_autoencoder(model, AE_PATH, half=True, **meta)
    print(f"ae: {meta['steps']} steps in {log.seconds:.0f} s, test PSNR {meta['psnr']:.2f} dB, "
          f"scale factor {scale:.4f}, {AE_PATH.stat().st_size / 1e3:.0f} kB", flush=True)


def build_classifier() -> None:
    ae, _ = load_autoencoder(AE_PATH)
    t0 = time.perf_counter()
    net = train_shapes_classifier(seed=0, steps=3000, first_stage=ae, verbose=True)
    seconds = time.perf_counter() - t0
    torch.save(net.state_dict(), DATA_DIR / SHAPES_WEIGHTS_FILE)
    net = load_shapes_classifier()
    test = make_shapes(1000, seed=TEST_SEED)
    acc = prompt_accuracy(predict_attributes(net, test.images), test.labels)
    with torch.no_grad():
        rec = torch.cat([ae.decode_latents(ae.encode_latents(xb)).clamp(-1, 1) for xb in test.images.split(250)])
    acc_rec = prompt_accuracy(predict_attributes(net, rec), test.labels)
    print(f"classifier: {seconds:.0f} s; accuracy on 1,000 test images {acc}; "
          f"on their f=4 reconstructions {acc_rec}", flush=True)


TEXT_CONFIG = TextEncoderConfig(dim=64, depth=2, heads=4, max_len=10)
TEXT_UNET = UNetConfig(in_ch=4, out_ch=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                       heads=4, groups=8, context_dim=TEXT_CONFIG.dim, image_size=8)
T, PREDICTION, BATCH, LR, EMA_DECAY, P_UNCOND = 1000, "v", 64, 1e-3, 0.999, 0.1


def build_ldm(seconds: float, resume: bool = False) -> None:
    """Train the text encoder and the latent UNet jointly for `seconds` of CPU time; with
    `resume`, continue from the shipped file's EMA weights (a fresh optimizer, a new data order,
    EMA without warm-up) and add the steps and seconds to its record."""
    data = make_shapes(N_TRAIN, seed=TRAIN_SEED)
    ae, _ = load_autoencoder(AE_PATH)
    t0 = time.perf_counter()
    z = cached_latents(ae, data.images, cache_dir() / "latents_shapes_f4.pt")  # (20000, 4, 8, 8)
    encode_seconds = time.perf_counter() - t0
    tokenizer = Tokenizer(max_len=TEXT_CONFIG.max_len)
    ids, _ = tokenizer(data.captions)  # (20000, 10)
    path = OUT / "ldm_shapes_text.pt"
    phase = 0
    torch.manual_seed(0)
    model = TextConditionedUNet(UNet(TEXT_UNET), TextEncoder(TEXT_CONFIG), tokenizer.pad_id)
    previous = {"steps": 0, "seconds": 0.0, "phases": [], "losses_every_10": []}
    if resume:
        loaded, previous = load_ldm(path)
        model.load_state_dict(loaded.denoiser.state_dict())
        previous.setdefault("phases", [{"steps": previous["steps"], "seconds": previous["seconds"], "seed": 0}])
        phase = len(previous["phases"])
    ldm = LatentDiffusion(ae, model, cosine_schedule(T), PREDICTION)
    ema = EMA(model, decay=EMA_DECAY, warmup=not resume)
    log = train_denoiser(model, batches(z, ids, batch_size=BATCH, seed=phase), ldm.schedule, 10**9, lr=LR,
                         prediction=PREDICTION, bf16=True, ema=ema, max_seconds=seconds,
                         cond_dropout=P_UNCOND, null_cond=tokenizer.null_ids(), clock=time.process_time,
                         generator=torch.Generator().manual_seed(phase))
    ema.copy_to(model)
    phases = previous["phases"] + [{"steps": len(log.losses), "seconds": round(log.seconds, 1), "seed": phase}]
    meta = {"dataset": f"make_shapes({N_TRAIN}, seed={TRAIN_SEED})", "steps": previous["steps"] + len(log.losses),
            "batch": BATCH, "lr": LR, "ema_decay": EMA_DECAY, "p_uncond": P_UNCOND, "bf16": True,
            "seconds": round(previous["seconds"] + log.seconds, 1), "clock": "time.process_time", "phases": phases,
            "encode_seconds": round(encode_seconds, 1), "scale_factor": float(ae.scale_factor),
            "losses_every_10": previous["losses_every_10"] + log.losses[::10]}
    save_ldm(ldm, path, AE_PATH.name, **meta)
    print(f"ldm: {len(log.losses)} steps in {log.seconds:.0f} s (total {meta['steps']} steps, "
          f"{meta['seconds']:.0f} s), {path.stat().st_size / 1e3:.0f} kB", flush=True)


SCALES, N_SWEEP, SWEEP_STEPS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0), 500, 25


@torch.no_grad()
def shapes_samples(ldm: LatentDiffusion, captions: list[str], scale: float, steps: int = SWEEP_STEPS,
                   seed: int = 0) -> torch.Tensor:
    """One sample per caption at guidance `scale`, in chunks of 250 (chunk i seeded seed + i)."""
    ids, _ = Tokenizer(max_len=TEXT_CONFIG.max_len)(captions)
    return torch.cat([ldm.sample(chunk, image_size=32, guidance_scale=scale, steps=steps,
                                 generator=torch.Generator().manual_seed(seed + i))
                      for i, chunk in enumerate(ids.split(250))])


def sweep() -> None:
    ldm, _ = load_ldm(OUT / "ldm_shapes_text.pt")
    net = load_shapes_classifier()
    test = make_shapes(N_SWEEP, seed=TEST_SEED)
    features = lambda x: net.features(x.clamp(-1, 1))  # noqa: E731
    other = make_shapes(N_SWEEP, seed=TEST_SEED + 1).images
    rows = []
    for scale in SCALES:
        t0 = time.perf_counter()
        x = shapes_samples(ldm, test.captions, scale)
        acc = prompt_accuracy(predict_attributes(net, x), test.labels)
        rows.append({"scale": scale, "fid": fid(test.images, x, features), **acc,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    with torch.no_grad():  # the ceiling the first stage allows: reconstructions of the test images
        rec = torch.cat([ldm.decode(ldm.encode(xb)) for xb in test.images.split(250)])
    real = {"fid_real_vs_real": fid(test.images, other, features),
            "fid_reconstructions": fid(test.images, rec, features),
            "accuracy_on_real": prompt_accuracy(predict_attributes(net, test.images), test.labels),
            "accuracy_on_reconstructions": prompt_accuracy(predict_attributes(net, rec), test.labels)}
    out = OUT / "ldm_shapes_sweep.json"
    out.write_text(json.dumps({"n": N_SWEEP, "steps": SWEEP_STEPS, "sampler": "DDIM", "rows": rows, **real}, indent=1))
    print(real, f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("ae", "classifier", "ldm", "sweep"), required=True)
    parser.add_argument("--seconds", type=float, default=600.0, help="ldm: CPU-time training budget (one thread)")
    parser.add_argument("--resume", action="store_true", help="ldm: continue training the shipped model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    start = time.perf_counter()
    if args.stage == "ae":
        build_ae()
    elif args.stage == "sweep":
        sweep()
    elif args.stage == "classifier":
        build_classifier()
    else:
        build_ldm(args.seconds, args.resume)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
