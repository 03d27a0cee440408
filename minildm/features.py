"""A small MNIST classifier whose penultimate features stand in for Inception's in FID and KID.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) compare two image sets through the
features of a pretrained network: Inception-v3's 2048-d pool features for natural images.
No ImageNet weights can be downloaded here, and Inception's features say little about 28 px
digits anyway, so the course uses the features of a classifier it trains itself on the
digits, like the fast.ai course's Fashion-MNIST FID. The recipe is fixed and seeded:

    python -m minildm.features        # writes data/digit_classifier.pt (~1 min on 2 CPU cores)

- `DigitClassifier`: three conv blocks, a `feature_dim`-wide feature layer, a linear head.
- `train_digit_classifier`: the seeded training run (random small affine jitter as augmentation).
- `load_digit_classifier`: the shipped weights, or (if missing) trained once and cached.
- `digit_features`: the (B, feature_dim) penultimate features that `minildm.metrics` compares.
- `ShapesClassifier`, `predict_attributes`, `prompt_accuracy`: lesson 07's judge of whether a
  text-to-image sample shows the shape, colour, size and position its caption asked for.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minildm.checkpoint import save_atomic
from minildm.data import (COLORS, DATA_DIR, POSITIONS, SHAPES, SIZES, ShapeLabels, batches, load_digits,
                          make_shapes)

WEIGHTS_FILE = "digit_classifier.pt"  # in data/ (shipped) or in the cache folder (fallback)


def cache_dir() -> Path:
    """Where weights trained on demand are kept: $MINILDM_CACHE, else ~/.cache/minildm."""
    return Path(os.environ.get("MINILDM_CACHE", Path.home() / ".cache" / "minildm")).expanduser()


# -----------------------------------------------------------------------------
# the network

@dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, int, int] = (16, 32, 64)  # widths of the conv blocks at 32, 16 and 8 px
    feature_dim: int = 64  # D, the width FID/KID compare; FID needs more than D samples per set
    dropout: float = 0.5  # on the flattened conv features, in training only
    n_classes: int = 10


class DigitClassifier(nn.Module):
    """Three blocks (conv 3x3, BatchNorm, ReLU, max-pool 2) take 32 px to 4 px; the flattened
    (64 * 4 * 4) map goes through Linear and a BatchNorm without scale and shift to the D
    features, then ReLU and Linear to the logits.

    The features are this penultimate layer *before* its ReLU, standardized by the BatchNorm's
    running statistics: on real digits each of the D coordinates has mean about 0 and variance
    about 1 (1.2 on average: the statistics were gathered on jittered digits with dropout on).
    So every coordinate varies (after the ReLU some units are 0 on every digit),
    a Gaussian, which FID fits, describes them better than a half-rectified vector, and
    x.y / D is of order 1, the scale KID's polynomial kernel (x.y / D + 1)^3 is made for.

    Takes digits (B, 1, 28, 28) or (B, 1, 32, 32) in [-1, 1]. A 28 px digit is first padded to
    32 px with the background value -1, exactly as ``load_digits(size=32)`` pads it, so both
    sizes of the same digit give the same features.
    """

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        blocks, in_ch = [], 1
        for out_ch in config.channels:
            blocks += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                       nn.ReLU(), nn.MaxPool2d(2)]
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.to_features = nn.Sequential(nn.Flatten(), nn.Dropout(config.dropout),
                                         nn.Linear(in_ch * 4 * 4, config.feature_dim),
                                         nn.BatchNorm1d(config.feature_dim, affine=False))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(config.feature_dim, config.n_classes))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, D) of digits x (B, 1, 28 or 32, same) in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) not in ((28, 28), (32, 32)):
            raise ValueError(f"expected digits of shape (B, 1, 28, 28) or (B, 1, 32, 32), got {tuple(x.shape)}")
        if x.shape[-1] == 28:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # (B, 1, 32, 32), as load_digits(size=32)
        h = self.blocks(x)  # (B, 64, 4, 4)
        return self.to_features(h)  # (B, D)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, 10)."""
        return self.head(self.features(x))


# -----------------------------------------------------------------------------
# training

@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500  # ~21 epochs of the 4,500 training digits at batch 64
    batch_size: int = 64
    lr: float = 3e-3  # peak of the one-cycle schedule (Smith & Topin 2019): up for 30% of steps, then down
    weight_decay: float = 5e-4  # AdamW
    max_shift: float = 2.0  # augmentation: uniform translation in [-2, 2] px
    max_rotation: float = 10.0  # augmentation: uniform rotation in [-10, 10] degrees
    max_scale: float = 0.1  # augmentation: uniform zoom in [0.9, 1.1]


def random_affine(x: Tensor, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """Jitter digits x (B, 1, S, S) in [-1, 1] by a random small rotation, zoom and shift,
    bilinearly resampled; pixels brought in from outside are background (-1)."""
    B, _, S, _ = x.shape
    U = lambda: 2 * torch.rand(B, generator=generator) - 1  # noqa: E731  U[-1, 1), (B,)
    angle = math.radians(config.max_rotation) * U()
    zoom = 1 + config.max_scale * U()
    shift = config.max_shift * torch.stack([U(), U()], dim=1) * 2 / S  # (B, 2) in grid units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    theta = torch.cat([theta, shift[:, :, None]], dim=2)  # (B, 2, 3): output grid -> input grid
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding of x + 1 = background -1


@torch.no_grad()
def accuracy(net: DigitClassifier, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Fraction of digits x (N, 1, S, S) whose argmax logit equals the label y (N,)."""
    was_training = net.training
    net.eval()
    correct = sum((net(xb).argmax(1) == yb).sum().item()
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    net.train(was_training)
    return correct / len(y)


@contextlib.contextmanager
def one_thread():
    """Run the block on one CPU thread (then restore the count): the feature nets' training
    is then the same bit for bit whatever the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_classifier(net: nn.Module, data: Iterator[tuple[Tensor, Tensor]], loss_fn: Callable[[Tensor, Tensor], Tensor],
                   steps: int, lr: float, weight_decay: float, verbose: bool = False) -> nn.Module:
    """The supervised loop every feature net of the project trains with: `steps` batches
    (x, y) of `data`, loss_fn(x, y) (which calls the net), AdamW with a one-cycle learning rate
    peaking at `lr` (Smith & Topin 2019). Returns the net in eval mode."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    t0 = time.perf_counter()
    for step, (xb, yb) in enumerate(data):
        if step == steps:
            break
        loss = loss_fn(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (step + 1) % 250 == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.1f} s", flush=True)
    return net.eval()


def train_digit_classifier(
    seed: int = 0,
    config: TrainConfig = TrainConfig(),
    net_config: ClassifierConfig = ClassifierConfig(),
    verbose: bool = False,
) -> DigitClassifier:
    """Train a DigitClassifier on ``load_digits("train")`` (4,500 digits), deterministically.

    Cross-entropy, AdamW with a one-cycle learning rate, batches from `minildm.data.batches`
    and random affine jitter (`random_affine`), all seeded by `seed`, on one CPU thread (so the
    result does not depend on the thread count). On the same machine and torch version the
    weights are the same bit for bit; elsewhere float rounding differs and the test accuracy
    may move by a few tenths of a percent. The test split is never used; data/README.md records
    the accuracy the defaults reach on it. Returns the net in eval mode.
    """
    with one_thread():
        torch.manual_seed(seed)  # the initial weights and dropout
        g = torch.Generator().manual_seed(seed + 1)  # the augmentation
        x, y = load_digits("train", size=32)  # (4500, 1, 32, 32), (4500,)
        net = DigitClassifier(net_config)
        return fit_classifier(net, batches(x, y, batch_size=config.batch_size, seed=seed),
                              lambda xb, yb: F.cross_entropy(net(random_affine(xb, config, g)), yb),
                              config.steps, config.lr, config.weight_decay, verbose)


# -----------------------------------------------------------------------------
# loading

def weights_path() -> Path:
    """The weights `load_digit_classifier` reads: data/digit_classifier.pt if shipped, else the
    cache file (which may not exist yet)."""
    shipped = DATA_DIR / WEIGHTS_FILE
    return shipped if shipped.is_file() else cache_dir() / WEIGHTS_FILE


def load_digit_classifier(device: str | torch.device = "cpu") -> DigitClassifier:
    """The trained DigitClassifier in eval mode, with frozen parameters.

    Reads data/digit_classifier.pt (made by ``python -m minildm.features``). If that file is
    missing, trains it once with `train_digit_classifier()` (~1 min) and caches it in
    `cache_dir()`; later calls read the cache.
    """
    path = weights_path()
    if not path.is_file():
        print(f"{DATA_DIR / WEIGHTS_FILE} not found: training the digit classifier once, caching it at {path}")
        save_atomic(train_digit_classifier().state_dict(), path)
    net = DigitClassifier()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.requires_grad_(False)
    return net.eval().to(device)


@functools.lru_cache(maxsize=None)
def _shared_classifier(device: torch.device) -> DigitClassifier:
    return load_digit_classifier(device)


def digit_features(x: Tensor) -> Tensor:
    """Penultimate features (B, D=64) of the shipped digit classifier for digits x
    (B, 1, 28, 28) or (B, 1, 32, 32) in [-1, 1]; values outside are clamped to [-1, 1], as
    saving an image would. Gradients flow to x; wrap in torch.no_grad() for evaluation."""
    net = _shared_classifier(x.device)
    return net.features(x.float().clamp(-1, 1))


# -----------------------------------------------------------------------------
# the shapes' attribute classifier: prompt accuracy of text-to-image samples (lesson 07)

SHAPES_WEIGHTS_FILE = "shapes_classifier.pt"  # in data/, made by data/build_latent_shapes.py
SHAPE_ATTRIBUTES = ("shape", "color", "size", "position")  # fields of minildm.data.ShapeLabels


class ShapesClassifier(nn.Module):
    """Reads the four attributes a shapes caption names from an image (B, 3, 32, 32) in [-1, 1]:
    the DigitClassifier's three conv blocks (3 input channels), a 128-wide hidden layer and one
    linear head per attribute. Position needs no special layer: the flattened 4x4 map keeps
    where things are."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), hidden: int = 128):
        super().__init__()
        blocks, in_ch = [], 3
        for out_ch in channels:
            blocks += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                       nn.ReLU(), nn.MaxPool2d(2)]
            in_ch = out_ch
        self.trunk = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(in_ch * 4 * 4, hidden))
        self.heads = nn.ModuleDict({
            "shape": nn.Linear(hidden, len(SHAPES)), "color": nn.Linear(hidden, len(COLORS)),
            "size": nn.Linear(hidden, len(SIZES)), "position": nn.Linear(hidden, len(POSITIONS))})

    def features(self, x: Tensor) -> Tensor:
        """The hidden layer before its ReLU, (B, hidden): the features of a shapes FID."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"expected shapes images of shape (B, 3, 32, 32), got {tuple(x.shape)}")
        return self.trunk(x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per attribute: {"shape": (B, 5), "color": (B, 6), "size": (B, 3), "position": (B, 9)}."""
        h = F.relu(self.features(x))  # (B, hidden)
        return {name: head(h) for name, head in self.heads.items()}


def train_shapes_classifier(seed: int = 0, steps: int = 2000, batch_size: int = 64, n_train: int = 20000,
                            lr: float = 3e-3, first_stage: nn.Module | None = None,
                            verbose: bool = False) -> ShapesClassifier:
    """Train a ShapesClassifier on make_shapes(n_train, seed=seed + 100) (a set the diffusion
    models never see): summed cross-entropy of the four heads, AdamW with a one-cycle learning
    rate, one CPU thread, seeded. Returns the net in eval mode.

    first_stage: an autoencoder whose reconstructions (posterior mean, decoded) of the same
    images are added to the training set with the same labels. A latent model's samples are
    drawn by that decoder, slightly softer than the renderer's shapes; a classifier that has
    only seen crisp shapes misreads soft ones (a blurred small star as a square), which would
    count as the diffusion model's error. Its accuracy on reconstructions is the ceiling."""
    with one_thread():
        torch.manual_seed(seed)
        data = make_shapes(n_train, seed=seed + 100)
        x = data.images  # (N, 3, 32, 32)
        y = torch.stack([getattr(data.labels, a) for a in SHAPE_ATTRIBUTES], 1)  # (N, 4)
        if first_stage is not None:
            with torch.no_grad():
                rec = torch.cat([first_stage.decode(first_stage.encode(xb).mode()).clamp(-1, 1)
                                 for xb in x.split(500)])
            x, y = torch.cat([x, rec]), torch.cat([y, y])  # (2N, ...)
        net = ShapesClassifier()

        def loss_fn(xb: Tensor, yb: Tensor) -> Tensor:  # the four heads' cross-entropies, summed
            logits = net(xb)
            return sum(F.cross_entropy(logits[a], yb[:, i]) for i, a in enumerate(SHAPE_ATTRIBUTES))

        return fit_classifier(net, batches(x, y, batch_size=batch_size, seed=seed), loss_fn, steps, lr,
                              5e-4, verbose)


def load_shapes_classifier(device: str | torch.device = "cpu") -> ShapesClassifier:
    """The shipped ShapesClassifier (data/shapes_classifier.pt) in eval mode, frozen."""
    path = DATA_DIR / SHAPES_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python data/build_latent_shapes.py --stage classifier`")
    net = ShapesClassifier()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.requires_grad_(False)
    return net.eval().to(device)


@torch.no_grad()
def predict_attributes(net: ShapesClassifier, x: Tensor, batch_size: int = 500) -> dict[str, Tensor]:
    """The classifier's argmax per attribute for images x (N, 3, 32, 32): {name: (N,) int64}."""
    was_training = net.training
    net.eval()
    outs = [net(xb.float().clamp(-1, 1)) for xb in x.split(batch_size)]
    net.train(was_training)
    return {a: torch.cat([o[a].argmax(1) for o in outs]).cpu() for a in SHAPE_ATTRIBUTES}


def prompt_accuracy(predicted: dict[str, Tensor], target: ShapeLabels) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals the prompt's, per attribute, and
    "all": the fraction with all four (shape, colour, size, position) right."""
    hits = {a: predicted[a] == getattr(target, a).cpu() for a in SHAPE_ATTRIBUTES}  # (N,) bool each
    out = {a: h.float().mean().item() for a, h in hits.items()}
    out["all"] = torch.stack(list(hits.values())).all(0).float().mean().item()
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    net = train_digit_classifier(seed=0, verbose=True)
    seconds = time.perf_counter() - t0
    x_test, y_test = load_digits("test")
    acc = accuracy(net, x_test, y_test)
    out = DATA_DIR / WEIGHTS_FILE
    save_atomic(net.state_dict(), out)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"trained in {seconds:.1f} s, {n_params} parameters; test accuracy {acc:.4f}; wrote {out} "
          f"({out.stat().st_size / 1024:.0f} KB)")
