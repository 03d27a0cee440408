"""Saving a run's state and restoring it exactly (`minildm.checkpoint` holds the file format).

`save_run` writes the weights, the EMA, the optimizer, the RNG states and the config of a
step; `restore_run` loads them back after `check_compatible` has compared the saved config
with the new one: a key that defines the model (e.g. unet.ch) stops the resume with a
CheckpointError naming it; any other change (e.g. steps, lr) is reported and allowed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from minildm import checkpoint as ckpt
from minildm.config import TrainConfig, flatten, to_dict
from minildm.ema import EMA
from minildm.stages import FirstStageExtras


MODEL_KEYS = {"diffusion": ("stage", "unet.", "diffusion.", "data.image_size", "data.source", "first_stage", "text"),
              "autoencoder": ("stage", "autoencoder.", "quantizer", "data.image_size", "data.source",
                              "loss.disc_weight", "loss.learn_logvar", "loss.discriminator.")}


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


def restore_run(c: ckpt.Checkpoint, config: TrainConfig, net: nn.Module, ema: EMA | None,
                opt: torch.optim.Optimizer) -> int:
    """Load a checkpoint (`minildm.checkpoint.read_checkpoint`) into net, ema and opt and
    restore the RNGs; return its step."""
    path = c.path
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


def save_run(config: TrainConfig, step: int, net: nn.Module, ema: EMA | None, opt: torch.optim.Optimizer,
             extra: dict[str, bytes] | None = None, extra_state: dict | None = None) -> Path:
    """Write the checkpoint of `step` (rank 0 only). `extra`: more files (the first stage of a
    latent run, a discriminator's weights); `extra_state`: more entries of state.pt (a
    discriminator's optimizer)."""
    ema_tensors, ema_state = None, None
    if ema is not None:
        ema_tensors = {**{f"params.{k}": v for k, v in ema.params.items()},
                       **{f"buffers.{k}": v for k, v in ema.buffers.items()}}
        ema_state = {"decay": ema.decay, "warmup": ema.warmup, "num_updates": ema.num_updates}
    state = {"step": step, "optimizer": opt.state_dict(), "rng": ckpt.rng_state(), "ema": ema_state,
             "data": {"micro_batch": step * config.optim.accumulate}, **(extra_state or {})}
    return ckpt.write_checkpoint(Path(config.run_dir) / "checkpoints", step, to_dict(config), net.state_dict(),
                                 ema_tensors, state, config.keep_last, extra)



def extras_to_save(extras: FirstStageExtras, opt_d: torch.optim.Optimizer | None) -> tuple[dict[str, bytes], dict]:
    """The autoencoder stage's extra checkpoint content: the discriminator's weights (and
    BatchNorm buffers) as discriminator.safetensors, its optimizer and the learned
    log-variance as entries of state.pt. Empty without them."""
    files, state = {}, {}
    if extras.discriminator is not None:
        files["discriminator.safetensors"] = safetensors.torch.save(
            {k: v.detach().cpu().contiguous() for k, v in extras.discriminator.state_dict().items()})
        state["discriminator_optimizer"] = opt_d.state_dict()
    if extras.logvar is not None:
        state["logvar"] = extras.logvar.detach().cpu().clone()
    return files, state


def restore_extras(c: ckpt.Checkpoint, extras: FirstStageExtras, opt_d: torch.optim.Optimizer | None) -> None:
    """Load what `extras_to_save` wrote back into the discriminator, its optimizer and logvar."""
    if extras.discriminator is not None:
        name = "discriminator.safetensors"
        if name not in c.extra or "discriminator_optimizer" not in c.state:
            raise ckpt.CheckpointError(f"{c.path} has no discriminator (it was saved with loss.disc_weight=0); "
                                       "resume with --loss.disc_weight=0 or start a new run_dir")
        ckpt.load_weights(extras.discriminator, ckpt.load_tensors(c.path / name, c.extra[name]), c.path)
        opt_d.load_state_dict(c.state["discriminator_optimizer"])
    if extras.logvar is not None:
        if "logvar" not in c.state:
            raise ckpt.CheckpointError(f"{c.path} has no learned logvar; resume with --loss.learn_logvar=false")
        with torch.no_grad():
            extras.logvar.copy_(c.state["logvar"])
