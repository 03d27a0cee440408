"""Saving a run's state and restoring it exactly (`minildm.checkpoint` holds the file format).

`save_run` writes the weights, the EMA, the optimizer, the RNG states and the config of a
step; `restore_run` loads them back after `check_compatible` has compared the saved config
with the new one: a key that defines the model (e.g. unet.ch) stops the resume with a
CheckpointError naming it; any other change (e.g. steps, lr) is reported and allowed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from minildm import checkpoint as ckpt
from minildm.config import TrainConfig, flatten, to_dict
from minildm.ema import EMA


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

