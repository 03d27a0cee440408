"""Exponential moving average (EMA) of a model's weights.

Diffusion models are sampled with an EMA of their weights (Ho et al. 2020, Appendix B:
decay 0.9999; Song & Ermon 2020, "Improved Techniques", Technique 5): the average of the
last ~1/(1-decay) steps of SGD gives much better samples than the last iterate.

    ema = EMA(model, decay=0.999, warmup=True)
    ... optimizer.step(); ema.update(model)
    with ema.swapped(model):   # sample with the averaged weights
        ...
"""

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


class EMA:
    """A shadow copy of a model's parameters, updated as ema = decay*ema + (1-decay)*param.

    warmup=True uses decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update
    (n = 0, 1, ...), as TensorFlow's ExponentialMovingAverage(num_updates) and latent
    diffusion's LitEma do, so that the random initial weights are forgotten quickly.
    Buffers (e.g. BatchNorm statistics) are not averaged: they are copied at each update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * param, for every parameter; copy the buffers."""
        decay = self.current_decay()
        for n, p in model.named_parameters():
            self.params[n].lerp_(p.detach(), 1.0 - decay)  # ema + (1 - decay) * (p - ema)
        for n, b in model.named_buffers():
            self.buffers[n].copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the EMA ones."""
        for n, p in model.named_parameters():
            p.copy_(self.params[n])
        for n, b in model.named_buffers():
            b.copy_(self.buffers[n])

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into `model`; the training weights come back on exit."""
        saved = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in model.state_dict(keep_vars=True).items():
                    t.copy_(saved[n])

    def state_dict(self) -> dict:
        """Everything needed to resume: decay settings, update count, shadow tensors."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "params": dict(self.params), "buffers": dict(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the parameter names must match this EMA's model."""
        for key in ("params", "buffers"):
            mine, theirs = getattr(self, key), state[key]
            if mine.keys() != theirs.keys():
                missing, unexpected = mine.keys() - theirs.keys(), theirs.keys() - mine.keys()
                raise KeyError(f"EMA {key} mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
            for n, t in theirs.items():
                mine[n].copy_(t)
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
