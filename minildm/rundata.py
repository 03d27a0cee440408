"""The data of a training run: the images of `config.data`, read in a resumable order.

`make_dataset` gives the shipped digits or an image folder; `ResumableBatches` cuts a
seeded permutation per epoch into the global batch and hands each rank its rows, so that
micro-batch k is a function of (seed, k) alone and a resumed run reads on where it stopped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minildm.config import ConfigError, TrainConfig
from minildm.data import DataError, ImageFolder, load_digits
from minildm.distributed import seed_for


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



def validation_images(config: TrainConfig, n: int) -> Tensor:
    """n held-out images, evenly spaced through the digits' test split (which is sorted by
    class: every digit appears) or through the image folder."""
    ds = make_dataset(config, "test" if config.data.source == "digits" else "train")
    return torch.stack([ds[i] for i in torch.linspace(0, len(ds) - 1, min(n, len(ds))).long().tolist()])

