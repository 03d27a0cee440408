"""The run loop behind ``python -m minildm train``: long, resumable, multi-GPU training runs.

`run(config)` trains one stage (see `minildm.config.TrainConfig.stage`), on one device or
under torchrun (DDP: nccl on GPUs, gloo on CPUs), and writes to ``config.run_dir``:

    checkpoints/step_*/   complete, atomic checkpoints, the last `keep_last` (`minildm.checkpoint`)
    log.jsonl             every `log_every` steps: each loss term, lr, images/s, peak memory
    samples/step_*.png    sample grids (diffusion) or originals over reconstructions (autoencoder)
    metrics.jsonl         validation numbers at the same steps

Exact resume. Everything random at step k is a function of (seed, k): the data order is a
permutation seeded by (seed, epoch), read from the position k * accumulate; the noise
(t, eps, the posterior samples) and torch's global generator (dropout) are reseeded from
(seed, k, micro-batch, rank) before each step. With the weights, the optimizer and the EMA
restored, a run killed at any point and resumed with `resume=True` ends with the same
weights as one that never stopped. The diffusion noise of a step is drawn for the whole
global batch and sliced per rank, so the result does not depend on the number of GPUs.

Per step, with a global batch of G images, A accumulation steps and W processes, each
process reads micro-batches of G / (A W) images; the micro-batch is the global batch's
rows [r G/(A W), (r+1) G/(A W)) for rank r, so DDP's gradient average equals the
single-process gradient of the same G images.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from minildm import checkpoint as ckpt
from minildm.autoencoder import AutoencoderKL, VQAutoencoder, VQAutoencoderConfig
from minildm.config import ConfigError, TrainConfig, flatten, to_dict
from minildm.data import DataError, ImageFolder, load_digits
from minildm.diffusion import extract, q_sample, target
from minildm.ema import EMA
from minildm.firststage import first_stage_terms, total_loss
from minildm.schedules import Schedule, cosine_schedule, linear_schedule
from minildm.weighting import loss_weight


class RunError(RuntimeError):
    """A run stopped for a reason the user must act on (e.g. a non-finite loss)."""


@dataclass
class Rank:
    """Where this process sits in a (possibly one-process) run."""

    rank: int  # global rank; 0 logs and writes checkpoints
    world: int  # number of processes
    device: torch.device  # this process's device


# ----------------------------------------------------------------------------------------
# devices, processes and seeds

def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """cuda (this process's GPU), then mps, then cpu, unless `choice` names one."""
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if choice in ("auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    if choice not in ("auto", "cpu"):
        raise ConfigError(f"device={choice} is not available here; use --device=auto")
    return torch.device("cpu")


def setup_rank(config: TrainConfig) -> Rank:
    """Join the torchrun process group if WORLD_SIZE > 1 (nccl on GPUs, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(config.device, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Rank(rank=dist.get_rank() if world > 1 else 0, world=world, device=device)


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([p + 1 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------
# data

class TensorImages(torch.utils.data.Dataset):
    """Images already in memory (N, C, H, W), item i is (C, H, W)."""

    def __init__(self, x: Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


class ResumableBatches(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches, forever, starting at micro-batch `start`.

    Epoch e is a permutation seeded by (seed, e), cut into global micro-batches of
    `global_batch` rows (the last incomplete one dropped); rank r takes rows
    [r m, (r+1) m) of each, m = global_batch / world. Micro-batch k is thus a function
    of (seed, k) alone: resuming at k = step * accumulate continues the same stream.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int = 0):
        if n < global_batch:
            raise DataError(f"the dataset has {n} images, fewer than one micro-batch of {global_batch}")
        self.n, self.G, self.rank, self.world, self.seed, self.start = n, global_batch, rank, world, seed, start

    def __iter__(self):
        per_epoch, m = self.n // self.G, self.G // self.world
        k = self.start
        epoch, perm = -1, None
        while True:
            e, b = divmod(k, per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_for(self.seed, e)))
            lo = b * self.G + self.rank * m
            yield perm[lo:lo + m].tolist()
            k += 1


def channels_of(config: TrainConfig) -> int:
    return 1 if config.data.source == "digits" else 3


def make_dataset(config: TrainConfig, split: str = "train") -> torch.utils.data.Dataset:
    """The training images: the shipped digits, or an image folder (DataError if missing/empty)."""
    d = config.data
    if d.source == "digits":
        if d.image_size not in (28, 32):
            raise ConfigError(f"data.image_size={d.image_size}: the digits come in 28 or 32")
        return TensorImages(load_digits(split, d.image_size)[0])
    if d.path is None:
        raise ConfigError("data.source=folder needs data.path: --data.path=/path/to/images")
    return ImageFolder(d.path, d.image_size)


def next_batch(it) -> Tensor:
    """The next micro-batch; a DataError raised in a worker is shortened to its own line."""
    try:
        return next(it)
    except DataError as e:
        raise DataError(str(e).strip().splitlines()[-1].removeprefix("minildm.data.DataError: ")) from None


# ----------------------------------------------------------------------------------------
# the stages: a model builder and a loss-terms function each

def build_model(config: TrainConfig) -> nn.Module:
    """The network of config.stage, on the CPU, initialised from torch's current generator."""
    from minildm.unet import UNet  # heavy module, only for this stage
    c = channels_of(config)
    if config.stage == "diffusion":
        if config.unet.in_ch != c or config.unet.out_ch != c:
            raise ConfigError(f"the data has {c} channel(s) but unet.in_ch={config.unet.in_ch}, "
                              f"unet.out_ch={config.unet.out_ch}; set --unet.in_ch={c} --unet.out_ch={c}")
        if config.unet.image_size != config.data.image_size:
            raise ConfigError(f"unet.image_size={config.unet.image_size} differs from "
                              f"data.image_size={config.data.image_size}")
        return UNet(config.unet)
    if config.autoencoder.in_ch != c:
        raise ConfigError(f"the data has {c} channel(s) but autoencoder.in_ch={config.autoencoder.in_ch}; "
                          f"set --autoencoder.in_ch={c}")
    if config.quantizer is not None:
        fields = {k: getattr(config.autoencoder, k) for k in config.autoencoder.__dataclass_fields__}
        return VQAutoencoder(VQAutoencoderConfig(**fields, quantizer=config.quantizer))
    return AutoencoderKL(config.autoencoder)


def make_schedule(config: TrainConfig) -> Schedule:
    d = config.diffusion
    return linear_schedule(d.T) if d.schedule == "linear" else cosine_schedule(d.T)


def diffusion_terms(model: nn.Module, x0: Tensor, schedule: Schedule, config: TrainConfig,
                    g: torch.Generator, r: Rank) -> dict[str, Tensor]:
    """{"loss": E w_t ||target - model(x_t, t)||^2} (DDPM Algorithm 1), t and eps drawn from
    `g` for the whole global micro-batch and sliced to this rank's rows."""
    d, m = config.diffusion, x0.shape[0]
    G = m * r.world
    t_all = torch.randint(0, schedule.T, (G,), device=x0.device, generator=g)
    eps_all = torch.randn((G, *x0.shape[1:]), device=x0.device, generator=g)
    t, eps = t_all[r.rank * m:(r.rank + 1) * m], eps_all[r.rank * m:(r.rank + 1) * m]
    xt = q_sample(x0, t, eps, schedule)
    pred = model(xt, t.to(x0.dtype))
    err = (pred.float() - target(x0, eps, extract(schedule.alpha_bar, t, x0), d.prediction).float()).pow(2)
    if d.weighting == "simple":
        return {"loss": err.mean()}
    w = loss_weight(schedule, t.cpu(), d.weighting, d.prediction).to(err.device, err.dtype)  # (m,)
    return {"loss": (w * err.reshape(m, -1).mean(1)).mean()}


def autoencoder_terms(model: nn.Module, x: Tensor, config: TrainConfig, g: torch.Generator) -> dict[str, Tensor]:
    """The first-stage terms of `minildm.firststage` and their weighted sum "loss". Through a
    DDP or compiled wrapper the KL posterior samples from torch's generator (reseeded per step)."""
    terms, _, _ = first_stage_terms(model, x, config.loss, g)
    terms["loss"] = total_loss(terms, config.loss)
    return terms


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to optim.lr over warmup_steps, then cosine decay to min_lr_ratio * lr."""
    o = config.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if not o.cosine:
        return o.lr
    progress = (step - o.warmup_steps) / max(1, config.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------------------
# resume

MODEL_KEYS = {"diffusion": ("stage", "unet.", "diffusion.", "data.image_size", "data.source"),
              "autoencoder": ("stage", "autoencoder.", "quantizer", "data.image_size", "data.source")}


def check_compatible(saved: dict, config: TrainConfig, where: Path) -> list[str]:
    """Raise CheckpointError if the model-defining keys differ; return the other differing keys."""
    old, new = flatten(saved), flatten(to_dict(config))
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    fatal = [k for k in differ if k.startswith(MODEL_KEYS[config.stage])]
    if fatal:
        pairs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal[:6])
        raise ckpt.CheckpointError(f"cannot resume from {where}: the config differs in {pairs}; "
                                   "use the checkpoint's values or a new run_dir")
    return differ


def restore_run(path: Path, config: TrainConfig, net: nn.Module, ema: EMA | None,
            opt: torch.optim.Optimizer) -> int:
    """Load a checkpoint into net, ema and opt and restore the RNGs; return its step."""
    c = ckpt.read_checkpoint(path)
    changed = check_compatible(c.config, config, path)
    if changed:
        print(f"note: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
    ckpt.load_weights(net, c.model, c.path)
    opt.load_state_dict(c.state["optimizer"])
    if ema is not None and c.ema is not None:
        ema.load_state_dict({**c.state["ema"],
                             "params": {k[7:]: v for k, v in c.ema.items() if k.startswith("params.")},
                             "buffers": {k[8:]: v for k, v in c.ema.items() if k.startswith("buffers.")}})
    ckpt.set_rng_state(c.state["rng"])
    return c.step


def save_run(config: TrainConfig, step: int, net: nn.Module, ema: EMA | None, opt: torch.optim.Optimizer) -> Path:
    """Write the checkpoint of `step` (rank 0 only)."""
    ema_tensors, ema_state = None, None
    if ema is not None:
        ema_tensors = {**{f"params.{k}": v for k, v in ema.params.items()},
                       **{f"buffers.{k}": v for k, v in ema.buffers.items()}}
        ema_state = {"decay": ema.decay, "warmup": ema.warmup, "num_updates": ema.num_updates}
    state = {"step": step, "optimizer": opt.state_dict(), "rng": ckpt.rng_state(), "ema": ema_state,
             "data": {"micro_batch": step * config.optim.accumulate}}
    return ckpt.write_checkpoint(Path(config.run_dir) / "checkpoints", step, to_dict(config), net.state_dict(),
                     ema_tensors, state, config.keep_last)


# ----------------------------------------------------------------------------------------
# the loop

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
    dataset = make_dataset(config)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    net = build_model(config).to(r.device)
    ema = EMA(net, config.ema_decay, config.ema_warmup) if config.ema_decay is not None else None
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    start = restore_run(existing, config, net, ema, opt) if existing is not None else 0
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
            model.train()
            sums: dict[str, Tensor] = {}  # each loss term summed over the micro-batches
            for a in range(A):
                torch.manual_seed(seed_for(config.seed, step, a, r.rank))  # dropout, VQ restarts
                g = torch.Generator(r.device).manual_seed(seed_for(config.seed, step, a, 1 << 20)
                                                          if config.stage == "diffusion" else
                                                          seed_for(config.seed, step, a, r.rank))
                x = next_batch(it).to(r.device, non_blocking=True)
                sync = nullcontext() if (r.world == 1 or a == A - 1) else model.no_sync()
                with sync, torch.autocast(r.device.type, torch.bfloat16, enabled=config.bf16):
                    terms = (diffusion_terms(model, x, schedule, config, g, r) if config.stage == "diffusion"
                             else autoencoder_terms(model, x, config, g))
                    if config.debug_nan_step == step + 1:
                        terms["loss"] = terms["loss"] * float("nan")
                    (terms["loss"] / A).backward()
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
                        last = save_run(config, done, net, ema, opt)
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
                    write_samples(config, net, ema, schedule, done, r.device)
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------
# sample grids and validation metrics (rank 0)

def validation_images(config: TrainConfig, n: int) -> Tensor:
    """n held-out images, evenly spaced through the digits' test split (which is sorted by
    class: every digit appears) or through the image folder."""
    ds = make_dataset(config, "test" if config.data.source == "digits" else "train")
    return torch.stack([ds[i] for i in torch.linspace(0, len(ds) - 1, min(n, len(ds))).long().tolist()])


def save_png(x: Tensor, path: Path, nrow: int = 8) -> None:
    """Save a batch (B, C, H, W) in [-1, 1] as one grid image (PNG via Pillow), atomically."""
    from PIL import Image

    from minildm.plotting import make_grid
    grid = ((make_grid(x.float().cpu().clamp(-1, 1), nrow) + 1) * 127.5).round().to(torch.uint8)  # (C, H, W)
    array = grid[0].numpy() if grid.shape[0] == 1 else grid.permute(1, 2, 0).numpy()
    tmp = path.with_name(f".tmp-{path.name}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def write_samples(config: TrainConfig, net: nn.Module, ema: EMA | None, schedule: Schedule | None,
                  step: int, device: torch.device) -> dict:
    """samples/step_*.png (EMA weights) and a line of metrics.jsonl: the validation loss of the
    denoiser at fixed (t, eps), or the PSNR / SSIM of the autoencoder's reconstructions."""
    from minildm.metrics import psnr, ssim
    from minildm.sampling import sample_ddim
    run_dir = Path(config.run_dir)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    x = validation_images(config, 256).to(device)
    n = config.n_samples
    with ema.swapped(net) if ema is not None else nullcontext():
        net.eval()
        g = torch.Generator(device).manual_seed(config.seed)
        if config.stage == "diffusion":
            metrics = {"val_loss": diffusion_terms(net, x, schedule, config, g, Rank(0, 1, device))["loss"].item()}
            noise = torch.randn((n, *x.shape[1:]), device=device, generator=g)
            grid = sample_ddim(net, noise, schedule, min(config.sample_steps, schedule.T),
                               prediction=config.diffusion.prediction, clip_x0=1.0)
        else:
            x_rec = net(x, sample=False)[0] if isinstance(net, AutoencoderKL) else net(x)[0]
            metrics = {"psnr": psnr(x_rec.clamp(-1, 1), x).mean().item(),
                       "ssim": ssim(x_rec.clamp(-1, 1), x).mean().item()}
            pick = torch.linspace(0, len(x) - 1, min(n, len(x))).long()  # every class
            grid = torch.cat([x[pick], x_rec[pick]])  # originals above their reconstructions
        net.train()
    save_png(grid, run_dir / "samples" / f"step_{step:09d}.png")
    record = {"step": step, **metrics}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
