"""The data of a training run: the images of `config.data`, read in a resumable order.

`make_dataset` gives the shipped digits (with their labels), the procedural shapes (with
their captions' token ids) or an image folder (with class labels or captions' token ids,
if asked); `ResumableBatches` cuts a
seeded permutation per epoch into the global batch and hands each rank its rows, so that
micro-batch k is a function of (seed, k) alone and a resumed run reads on where it stopped.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from minildm.config import ConfigError, TrainConfig
from minildm.data import DataError, ImageFolder, load_digits, make_shapes, read_captions
from minildm.distributed import seed_for


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


@functools.lru_cache(maxsize=4)
def _shapes(n: int, seed: int, size: int):
    return make_shapes(n, seed=seed, size=size)


def held_out_shapes(config: TrainConfig):
    """The held-out shapes (images, labels, captions): 1,000 of seed 1 (training uses seed 0)."""
    return _shapes(1000, 1, config.data.image_size)


def make_dataset(config: TrainConfig, split: str = "train") -> torch.utils.data.Dataset:
    """The training (or held-out) data; item i is a tuple (x,) or (x, cond):

        digits  x (1, S, S); cond its class label () long if unet.num_classes is set
        shapes  x (3, S, S); cond the caption's token ids (text.max_len,) long if text is set
        folder  x (3, S, S) read from disk (DataError if the folder is missing or empty);
                cond its class label () long if unet.num_classes is set (data.class_subfolders),
                or its caption's token ids (text.max_len,) long if text is set (data.captions)

    The held-out split: the digits' test split; 1,000 shapes of seed 1; the folder itself."""
    d = config.data
    labels = config.stage == "diffusion" and config.unet.num_classes is not None
    text = config.stage == "diffusion" and config.text is not None
    if d.source == "digits":
        if d.image_size not in (28, 32):
            raise ConfigError(f"data.image_size={d.image_size}: the digits come in 28 or 32")
        x, y = load_digits(split, d.image_size)
        return torch.utils.data.TensorDataset(x, y) if labels else torch.utils.data.TensorDataset(x)
    if d.source == "shapes":
        s = _shapes(d.shapes_count, 0, d.image_size) if split == "train" else held_out_shapes(config)
        if not text:
            return torch.utils.data.TensorDataset(s.images)
        ids, _ = config.text.tokenizer()(s.captions)  # (n, L)
        return torch.utils.data.TensorDataset(s.images, ids)
    if d.path is None:
        raise ConfigError("data.source=folder needs data.path: --data.path=/path/to/images")
    if d.class_subfolders and config.stage == "diffusion" and not labels:
        raise ConfigError("data.class_subfolders=true gives class labels but the UNet takes none; "
                          "set --unet.num_classes to the number of class subfolders")
    if labels and not d.class_subfolders:
        raise ConfigError(f"unet.num_classes={config.unet.num_classes} needs labels: put each class's images "
                          "in a subfolder of data.path and set --data.class_subfolders=true")
    if d.captions and config.stage == "diffusion" and not text:
        raise ConfigError("data.captions=true gives captions but there is no text encoder: "
                          "set text=TextEncoderConfig(...) and unet.context_dim (see configs/tiny_shapes_text.py)")
    if text and not d.captions:
        raise ConfigError("a text-conditional run on a folder needs captions: put each image's caption in "
                          "a .txt file beside it and set --data.captions=true")
    folder = ImageFolder(d.path, d.image_size, class_subfolders=labels)
    if labels and len(folder.classes) != config.unet.num_classes:
        raise ConfigError(f"{d.path} has {len(folder.classes)} class subfolders but unet.num_classes="
                          f"{config.unet.num_classes}; set --unet.num_classes={len(folder.classes)}")
    if text:
        return CaptionedFolder(folder, config.text.tokenizer()(read_captions(folder.files))[0])
    return folder


class CaptionedFolder(torch.utils.data.Dataset):
    """An ImageFolder with one caption per image, tokenized: item i is (image, ids[i]),
    ids (N, L) long. `files`, `root` and `conditions` (= ids) as the folder's."""

    def __init__(self, folder: ImageFolder, ids: Tensor):
        self.folder, self.conditions = folder, ids
        self.files, self.root, self.classes = folder.files, folder.root, folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.folder[i], self.conditions[i]


def caption_vocabulary(config: TrainConfig) -> tuple[str, ...]:
    """The words of a text run on a captioned folder: the vocab_size - 2 most frequent words of
    its captions (`minildm.text.build_vocabulary`; the Tokenizer adds <pad> and <unk>)."""
    from minildm.text import build_vocabulary
    files = ImageFolder(config.data.path, config.data.image_size).files
    return build_vocabulary(read_captions(files), config.text.vocab_size - 2)


def next_batch(it) -> list[Tensor]:
    """The next micro-batch as a list [x] or [x, cond]; a DataError raised in a worker is
    shortened to its own line."""
    try:
        batch = next(it)
    except DataError as e:
        raise DataError(str(e).strip().splitlines()[-1].removeprefix("minildm.data.DataError: ")) from None
    return [batch] if isinstance(batch, Tensor) else list(batch)


def validation_batch(config: TrainConfig, n: int,
                     ds: torch.utils.data.Dataset | None = None) -> list[Tensor]:
    """n held-out items [x] or [x, cond], evenly spaced through the held-out split (the
    digits' test split is sorted by class: every digit appears). `ds`: that split if the
    caller has it already (a folder's is its training set: no second listing of the folder,
    no second read of its captions)."""
    if ds is None:
        ds = make_dataset(config, "train" if config.data.source == "folder" else "test")
    items = [ds[i] for i in torch.linspace(0, len(ds) - 1, min(n, len(ds))).long().tolist()]
    if isinstance(items[0], Tensor):
        return [torch.stack(items)]
    return [torch.stack(column) for column in zip(*items)]


def validation_images(config: TrainConfig, n: int) -> Tensor:
    """The images of `validation_batch`, (n, C, S, S)."""
    return validation_batch(config, n)[0]
