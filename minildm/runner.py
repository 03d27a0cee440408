"""The run loop behind ``python -m minildm train``: long, resumable, multi-GPU training runs.

`run(config)` trains one stage (see `minildm.config.TrainConfig.stage`), on one device or
under torchrun (DDP: nccl on GPUs, gloo on CPUs), and writes to ``config.run_dir``:

    checkpoints/step_*/   complete, atomic checkpoints, the last `keep_last` (`minildm.checkpoint`)
    log.jsonl             every `log_every` steps: each loss term, lr, images/s, peak memory
    samples/step_*.png    sample grids (diffusion) or originals over reconstructions (autoencoder)
    metrics.jsonl         validation numbers at the same steps
    latents.pt            a latent run on an image folder with data.encode_once: the encoded folder

Exact resume. Everything random at step k is a function of (seed, k): the data order is a
permutation seeded by (seed, epoch), read from the position k * accumulate; the noise
(t, eps, the posterior samples) and torch's global generator (dropout) are reseeded from
(seed, k, micro-batch, rank) before each step. With the weights, the optimizer and the EMA
restored, a run killed at any point and resumed with `resume=True` ends with the same
weights as one that never stopped. The diffusion noise of a step (and the condition
dropout) is drawn for the whole global batch and sliced per rank, so the result does not
depend on the number of GPUs (up to the order of the gradient sums). One exception: a
latent run on an image folder encodes each batch in the loop, and its posterior samples
are drawn per rank.

What each stage adds to the loop (`minildm.stages`):

    pixel diffusion      the UNet; unconditional, or class labels / captions as cond
    latent diffusion     + config.first_stage, frozen: its scale factor is measured at the
                         start, the training set encoded once (or per batch for a folder),
                         and it is stored in every checkpoint (first_stage.pt), so a resumed
                         run, `sample` and `evaluate` need nothing but the checkpoint
    first stage          + the perceptual net, a patch discriminator with its own optimizer
                         (discriminator.safetensors, its state in state.pt) and a learned
                         log-variance, switched on by config.loss

Per step, with a global batch of G images, A accumulation steps and W processes, each
process reads micro-batches of G / (A W) images; the micro-batch is the global batch's
rows [r G/(A W), (r+1) G/(A W)) for rank r, so DDP's gradient average equals the
single-process gradient of the same G images.

The pieces, one module each:

    minildm.distributed  device, rank and process group (torchrun), seeds, peak memory
    minildm.rundata      the dataset of config.data and the resumable batch order
    minildm.stages       each stage's network and loss terms
    minildm.resume       saving a step's full state, checking and restoring it
    minildm.monitor      sample grids and validation metrics
    minildm.runner       this file: the learning-rate schedule and the loop
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from minildm import checkpoint as ckpt
from minildm.config import ConfigError, TrainConfig
from minildm.distributed import Rank, peak_memory_mb, seed_for, setup_rank
from minildm.ema import EMA
from minildm.monitor import write_samples
from minildm.resume import extras_to_save, restore_extras, restore_run, save_run
from minildm.rundata import ResumableBatches, caption_vocabulary, make_dataset, next_batch, validation_batch
from minildm.stages import (FirstStage, FirstStageExtras, autoencoder_terms, build_model, check_first_stage, diffusion_terms,
                            encode, first_stage_bytes, first_stage_from_bytes, load_first_stage, make_schedule,
                            null_cond_like)


class RunError(RuntimeError):
    """A run stopped for a reason the user must act on (e.g. a non-finite loss)."""


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to optim.lr over warmup_steps, then cosine decay to min_lr_ratio * lr."""
    o = config.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if not o.cosine:
        return o.lr
    progress = (step - o.warmup_steps) / max(1, config.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))



def run(config: TrainConfig, resume: bool = False) -> Path:
    """Train config.stage for config.steps steps; return the last checkpoint's folder.

    Raises ConfigError, DataError, CheckpointError or RunError (non-finite loss) with a
    one-line message; checkpoints already written are never modified by a failure."""
    r = setup_rank(config)
    try:
        return _run(config, resume, r)
    finally:
        if r.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(config: TrainConfig, resume: bool, r: Rank) -> Path:
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    run_dir = Path(config.run_dir)
    o, A = config.optim, config.optim.accumulate
    if config.data.batch_size % (A * r.world):
        raise ConfigError(f"data.batch_size={config.data.batch_size} must be divisible by "
                          f"optim.accumulate * processes = {A} * {r.world}")
    existing = ckpt.latest(run_dir)
    if existing is not None and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints ({existing.name}); "
                          "pass --resume to continue, or choose another --run_dir")
    saved = ckpt.read_checkpoint(existing) if existing is not None else None
    if config.stage == "diffusion" and config.text is not None and config.data.source == "folder" \
            and not config.text.words:  # learn the vocabulary from the captions; checkpoints keep it
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, words=caption_vocabulary(config)))
    dataset = make_dataset(config)
    # the sample grids' and validation metrics' items, read once (a folder's: from its dataset)
    held_out = validation_batch(config, 256, dataset if config.data.source == "folder" else None) \
        if r.rank == 0 else []
    first_stage, latent_shape = None, None
    if config.stage == "diffusion" and config.first_stage is not None:
        first_stage, latent_shape, dataset = latent_setup(config, dataset, saved, r.device, r.rank)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    net = build_model(config, latent_shape).to(r.device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)
    extras = FirstStageExtras.build(config, r.device)  # perceptual net, discriminator, logvar (or None)
    ema = EMA(net, config.ema_decay, config.ema_warmup) if config.ema_decay is not None else None
    params = list(net.parameters()) + ([extras.logvar] if extras.logvar is not None else [])
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    D, opt_d, disc = extras.discriminator, None, None
    if D is not None:  # the patch discriminator: its own Adam, lr loss.disc_lr (or optim.lr), same schedule
        opt_d = torch.optim.AdamW(D.parameters(), lr=config.loss.disc_lr or o.lr, betas=tuple(o.betas), weight_decay=0.0)
        disc = D if r.world == 1 else nn.parallel.DistributedDataParallel(
            D, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    start = 0
    if saved is not None:
        start = restore_run(saved, config, net, ema, opt)
        restore_extras(saved, extras, opt_d)
    extra = {"first_stage.pt": first_stage_bytes(first_stage)} if first_stage is not None else {}
    encode_in_loop = first_stage is not None and not isinstance(dataset, torch.utils.data.TensorDataset)
    model = net
    if r.world > 1:
        ids = [r.device.index] if r.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if config.compile:
        model = torch.compile(model)
    schedule = make_schedule(config) if config.stage == "diffusion" else None

    m = config.data.batch_size // (A * r.world)  # images per micro-batch on this rank
    sampler = ResumableBatches(len(dataset), m * r.world, r.rank, r.world, config.seed, start * A)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers,
                                         pin_memory=r.device.type == "cuda",
                                         persistent_workers=config.data.num_workers > 0)
    it = iter(loader)
    stop_requested = []
    previous_handler = None
    if start < config.steps and threading.current_thread() is threading.main_thread():
        # preemption (SLURM, spot instances): finish the step, save, stop; all ranks agree below
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    main = r.rank == 0
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "log.jsonl", "a") if main else None
    bar = tqdm(total=config.steps, initial=start, disable=not (main and config.progress), desc=config.stage)
    last = existing
    t_log, images = time.perf_counter(), 0
    try:
        for step in range(start, config.steps):  # computes step + 1
            lr = lr_at(step, config)
            for group in opt.param_groups:
                group["lr"] = lr
            if opt_d is not None:
                for group in opt_d.param_groups:
                    group["lr"] = (config.loss.disc_lr or o.lr) * lr / o.lr
            gan_on = D is not None and step >= config.loss.disc_start
            model.train()
            sums: dict[str, Tensor] = {}  # each loss term summed over the micro-batches
            for a in range(A):
                torch.manual_seed(seed_for(config.seed, step, a, r.rank))  # dropout, VQ restarts
                g = torch.Generator(r.device).manual_seed(seed_for(config.seed, step, a, 1 << 20)
                                                          if config.stage == "diffusion" else
                                                          seed_for(config.seed, step, a, r.rank))
                batch = [b.to(r.device, non_blocking=True) for b in next_batch(it)]
                x, cond = batch[0], (batch[1] if len(batch) > 1 else None)  # images (or latents), labels / ids
                if encode_in_loop:  # an image folder of a latent run
                    x = encode(first_stage, x, torch.Generator(r.device).manual_seed(
                        seed_for(config.seed, step, a, r.rank, 2)))
                x = x.contiguous(memory_format=layout)
                last_micro = r.world == 1 or a == A - 1  # DDP: all-reduce the gradients only at the last
                sync = nullcontext() if last_micro else model.no_sync()
                sync_d = nullcontext() if last_micro or disc is D else disc.no_sync()
                with sync, sync_d, torch.autocast(r.device.type, torch.bfloat16, enabled=config.bf16):
                    if config.stage == "diffusion":
                        null = None if cond is None else null_cond_like(net, cond)
                        terms = diffusion_terms(model, x, cond, null, schedule, config, g, r)
                    else:
                        terms = autoencoder_terms(model, net, x, config, g, extras, disc, gan_on)
                    if config.debug_nan_step == step + 1:
                        terms["loss"] = terms["loss"] * float("nan")
                    ((terms["loss"] + terms.get("d_loss", 0.0)) / A).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                images += x.shape[0] * r.world
            values = torch.stack([sums[k] / A for k in sorted(sums)] + [torch.tensor(float(bool(stop_requested)),
                                                                                    device=r.device)])
            if r.world > 1:
                dist.all_reduce(values)
                values[:-1] /= r.world
            terms_now = dict(zip(sorted(sums), values[:-1].tolist()))
            if not math.isfinite(terms_now["loss"]):
                where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise RunError(f"non-finite loss ({terms_now['loss']}) at step {step + 1}; stopped before "
                               f"updating the weights; {where} (resume with --resume, perhaps a lower --optim.lr)")
            if o.grad_clip is not None:
                terms_now["grad_norm"] = float(nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gan_on:
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(net)
            done = step + 1
            bar.update(1)
            if main and (done % config.log_every == 0 or done == config.steps):
                dt = time.perf_counter() - t_log
                record = {"step": done, **terms_now, "lr": lr, "images_per_s": images / max(dt, 1e-9),
                          "peak_mem_mb": peak_memory_mb(r.device), "time": time.time()}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{terms_now['loss']:.4f}")
                t_log, images = time.perf_counter(), 0
            final = done == config.steps or values[-1].item() > 0
            if done % config.ckpt_every == 0 or final:
                failed = None
                if main:
                    try:
                        files, extra_state = extras_to_save(extras, opt_d)
                        last = save_run(config, done, net, ema, opt, {**extra, **files}, extra_state)
                    except OSError as e:
                        failed = RunError(f"could not write the checkpoint of step {done} ({e.strerror or e}); "
                                          f"nothing partial was left; the last good checkpoint is {last}")
                if r.world > 1:  # the other ranks learn whether rank 0 saved, rather than wait forever
                    flag = torch.tensor([float(failed is not None)], device=r.device)
                    dist.all_reduce(flag)
                    if flag.item() > 0 and failed is None:
                        failed = RunError(f"rank 0 could not write the checkpoint of step {done}; stopping")
                if failed is not None:
                    raise failed
            if main and ((config.sample_every and done % config.sample_every == 0) or done == config.steps):
                try:
                    write_samples(config, net, ema, schedule, done, r.device, held_out, first_stage)
                except OSError as e:  # a grid is not worth a run: warn and go on
                    print(f"warning: could not write samples at step {done}: {e}", file=sys.stderr)
            if values[-1].item() > 0:
                raise RunError(f"stopped by SIGTERM after step {done}; checkpoint {last} written; "
                               "continue with --resume")
    finally:
        bar.close()
        if log is not None:
            log.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return last if last is not None else ckpt.latest(run_dir)



def latent_setup(config: TrainConfig, dataset: torch.utils.data.Dataset, saved: ckpt.Checkpoint | None,
                 device: torch.device, rank: int = 0
                 ) -> tuple[FirstStage, tuple[int, int, int], torch.utils.data.Dataset]:
    """The frozen first stage of a latent run, its latent shape, and the training set in latents.

    A fresh run loads config.first_stage and measures its scale factor, 1 / std of the
    latents of (up to) the first 1,000 training images (LDM's rescaling, Sec. 4.3.2,
    `measure_scale_factor`), unless config.first_stage_scale gives one; a resumed run
    reads the first stage stored in its checkpoint (the same weights and factor, even if
    the file changed since). In-memory data (digits, shapes) is encoded once with
    `minildm.latent.encode_dataset` (one posterior sample per image, seeded); an image folder
    is encoded batch by batch in the loop (`encode`, posterior noise seeded per rank), or
    once here with data.encode_once (every rank encodes all of it, identically) and kept in
    run_dir/latents.pt, keyed by the first stage, the folder's files (names, sizes, times),
    the image size, the classes or captions and the seed: a resumed run reads it instead of encoding
    the folder again."""
    from minildm.autoencoder import measure_scale_factor
    from minildm.latent import cached, encode_dataset, fingerprint
    if saved is not None and "first_stage.pt" in saved.extra:
        first_stage = first_stage_from_bytes(saved.extra["first_stage.pt"], saved.path / "first_stage.pt")
    else:
        first_stage = load_first_stage(config.first_stage).to(device)
        check_first_stage(first_stage, config)
        if config.first_stage_scale is not None:
            first_stage.scale_factor.fill_(config.first_stage_scale)
        else:
            items = [dataset[i] for i in range(min(1000, len(dataset)))]  # (x,) tuples, or images (folder)
            images = torch.stack([x if isinstance(x, Tensor) else x[0] for x in items])
            measure_scale_factor(first_stage, images, generator=torch.Generator(device).manual_seed(config.seed))
    first_stage = first_stage.to(device)
    shape = check_first_stage(first_stage, config)
    g = torch.Generator(device).manual_seed(config.seed)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        z = encode_dataset(first_stage, dataset.tensors[0], generator=g)
        dataset = torch.utils.data.TensorDataset(z, *dataset.tensors[1:])
    elif config.data.encode_once:  # a folder, read in file order by the loader's workers
        def encode_folder() -> dict[str, Tensor]:
            loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=config.data.num_workers)
            it, z, cond = iter(loader), [], []
            for _ in tqdm(range(len(loader)), desc="encoding the folder once", disable=not config.progress):
                x, *c = next_batch(it)
                z.append(encode(first_stage, x.to(device), g).cpu())
                cond += c
            # (N, C, h, w) scaled latents, and a conditional run's class labels (N,) or caption ids (N, L)
            return {"latents": torch.cat(z), **({"cond": torch.cat(cond)} if cond else {})}

        files = "\n".join(f"{f.relative_to(dataset.root)}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                          for f in dataset.files)
        captions = getattr(dataset, "conditions", None)  # a captioned folder's token ids
        key = fingerprint(first_stage, captions, files, f"size={config.data.image_size}",
                          f"classes={dataset.classes}", f"seed={config.seed}")
        t = cached(Path(config.run_dir) / "latents.pt", key, encode_folder, write=rank == 0)
        dataset = torch.utils.data.TensorDataset(t["latents"], *([t["cond"]] if "cond" in t else []))
    return first_stage, shape, dataset
