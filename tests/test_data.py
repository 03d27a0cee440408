"""Tests for minildm.data: offline loading, shapes, ranges, determinism, and clear errors."""

import itertools
import re

import numpy as np
import pytest
import torch
from PIL import Image

from minildm import data as D
from minildm.data import DataError


def assert_image_tensor(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert x.shape == shape
    assert x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


# -----------------------------------------------------------------------------
# digits

def test_digits_sizes_and_ranges():
    x, y = D.load_digits("all")
    assert_image_tensor(x, (5000, 1, 28, 28))
    assert y.dtype == torch.int64 and y.shape == (5000,)
    assert torch.bincount(y).tolist() == [500] * 10
    assert x.min() == -1 and x.max() == 1  # background is -1, full ink is +1
    xtr, ytr = D.load_digits("train")
    xte, yte = D.load_digits("test")
    assert len(xtr) == 4500 and len(xte) == 500
    assert torch.bincount(ytr).tolist() == [450] * 10
    assert torch.bincount(yte).tolist() == [50] * 10


def test_digits_split_is_the_last_50_of_each_class_and_disjoint():
    x, y = D.load_digits("all")
    xtr, ytr = D.load_digits("train")
    xte, yte = D.load_digits("test")
    for c in range(10):
        assert torch.equal(xte[yte == c], x[y == c][-50:])
        assert torch.equal(xtr[ytr == c], x[y == c][:-50])
    train_rows = {row.numpy().tobytes() for row in xtr.flatten(1)}
    test_rows = {row.numpy().tobytes() for row in xte.flatten(1)}
    assert not train_rows & test_rows


def test_digits_padding_to_32():
    x28, y28 = D.load_digits("test", size=28)
    x32, y32 = D.load_digits("test", size=32)
    assert_image_tensor(x32, (500, 1, 32, 32))
    assert torch.equal(y28, y32)
    assert torch.equal(x32[..., 2:30, 2:30], x28)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x32[..., border] == -1).all()


def test_digits_are_cached_but_returned_fresh():
    x, _ = D.load_digits("train")
    x.fill_(0.5)  # must not leak into the cache
    x2, _ = D.load_digits("train")
    assert x2.min() == -1


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        D.load_digits("val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        D.load_digits("train", size=64)  # type: ignore[arg-type]


# -----------------------------------------------------------------------------
# shapes

CAPTION = re.compile(r"^a (\w+) (\w+) (\w+) (.+)$")


@pytest.fixture(scope="module")
def shapes() -> D.ShapesData:
    return D.make_shapes(10_000, seed=0)


def test_shapes_tensors(shapes):
    assert len(shapes) == 10_000
    assert_image_tensor(shapes.images, (10_000, 3, 32, 32))
    for name, vocab in [("shape", D.SHAPES), ("color", D.COLORS), ("size", D.SIZES),
                        ("position", D.POSITIONS), ("background", D.BACKGROUNDS)]:
        label = getattr(shapes.labels, name)
        assert label.dtype == torch.int64 and label.shape == (10_000,)
        assert torch.bincount(label, minlength=len(vocab)).min() > 0.7 * 10_000 / len(vocab)  # ~uniform
    assert len(D.SHAPES) >= 4 and len(D.COLORS) >= 6 and len(D.SIZES) >= 3 and len(D.POSITIONS) == 9


def test_shapes_captions_match_labels(shapes):
    for i, caption in enumerate(shapes.captions):
        size, color, shape, where = CAPTION.match(caption).groups()
        assert D.SIZES.index(size) == shapes.labels.size[i]
        assert D.COLORS.index(color) == shapes.labels.color[i]
        assert D.SHAPES.index(shape) == shapes.labels.shape[i]
        assert D.POSITION_PHRASES.index(where) == shapes.labels.position[i]
    assert D.make_shapes(1).captions[0].startswith("a ")
    assert len(set(shapes.captions)) > 500  # 5 * 6 * 3 * 9 = 810 possible


def test_shapes_are_drawn_where_and_as_labelled(shapes):
    """The pixel at the centre of the labelled grid cell has the labelled colour (the
    jitter is ~1 px and the smallest shape is ~6 px wide), bigger labels cover more pixels,
    and the corners show a dark or light background as labelled."""
    S = 32
    x01 = (shapes.images + 1) / 2  # (n, 3, S, S) in [0, 1]
    grid = torch.tensor([0.26, 0.50, 0.74])
    pos = shapes.labels.position
    rows, cols = (grid[pos // 3] * S).long(), (grid[pos % 3] * S).long()
    centre = x01[torch.arange(len(pos)), :, rows, cols]  # (n, 3)
    nearest = torch.cdist(centre, D.COLOR_RGB).argmin(1)
    assert (nearest == shapes.labels.color).float().mean() > 0.99

    rgb = D.COLOR_RGB[shapes.labels.color][:, :, None, None]
    area = ((x01 - rgb).abs().amax(1) < 0.1).float().sum((1, 2))  # (n,) pixels in the colour
    mean_area = [area[shapes.labels.size == s].mean() for s in range(3)]
    assert mean_area[0] < mean_area[1] < mean_area[2]

    corners = x01[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean((1, 2))  # (n,)
    assert torch.equal(corners > 0.475, shapes.labels.background == D.BACKGROUNDS.index("light"))


def test_shapes_deterministic_by_seed():
    a, b, c = D.make_shapes(64, seed=1), D.make_shapes(64, seed=1), D.make_shapes(64, seed=2)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert torch.equal(a.labels.shape, b.labels.shape)
    assert not torch.equal(a.images, c.images)
    assert_image_tensor(D.make_shapes(4, size=64).images, (4, 3, 64, 64))


# -----------------------------------------------------------------------------
# photos

def test_load_photos():
    photos = D.load_photos()
    assert len(photos) == len(D.PHOTO_NAMES) >= 6
    for img in photos:
        assert img.ndim == 3 and img.shape[0] == 3 and min(img.shape[1:]) == 288
        assert_image_tensor(img, img.shape)
    photos[0].fill_(0)  # a copy: the cache is untouched
    assert not torch.equal(D.load_photos()[0], photos[0])


def find_window(photo: torch.Tensor, crop: torch.Tensor) -> bool:
    """Whether `crop` (3, S, S) is exactly a window of `photo` (3, H, W)."""
    S = crop.shape[-1]
    H, W = photo.shape[1] - S + 1, photo.shape[2] - S + 1  # number of window positions
    candidate = torch.ones(H, W, dtype=torch.bool)
    for dy, dx in [(0, 0), (0, S - 1), (S - 1, 0), (S - 1, S - 1), (S // 2, S // 3)]:
        candidate &= (photo[:, dy : dy + H, dx : dx + W] == crop[:, dy : dy + 1, dx : dx + 1]).all(0)
    ys, xs = torch.nonzero(candidate, as_tuple=True)
    return any(torch.equal(photo[:, y : y + S, x : x + S], crop) for y, x in zip(ys.tolist(), xs.tolist()))


def test_photo_crops_are_windows_of_the_photos():
    crops = D.photo_crops(16, size=32, seed=3, downscales=(1.0,), flip=True)
    assert_image_tensor(crops, (16, 3, 32, 32))
    photos = D.load_photos()
    for crop in crops:
        assert any(find_window(p, crop) or find_window(p, crop.flip(-1)) for p in photos)
    for crop in D.photo_crops(4, size=32, seed=3, downscales=(1.0,), flip=False):
        assert any(find_window(p, crop) for p in photos)


def test_photo_crops_shapes_determinism_and_structure():
    a = D.photo_crops(256, size=32, seed=0)
    assert_image_tensor(a, (256, 3, 32, 32))
    assert torch.equal(a, D.photo_crops(256, size=32, seed=0))
    assert not torch.equal(a, D.photo_crops(256, size=32, seed=1))
    assert a.std((1, 2, 3)).median() > 0.05  # crops hold structure, not flat colour
    assert_image_tensor(D.photo_crops(8, size=64, names=("chelsea", "coffee")), (8, 3, 64, 64))
    with pytest.raises(ValueError, match="lena"):
        D.photo_crops(8, names=("lena",))


# -----------------------------------------------------------------------------
# image folders

def stripes(w: int, h: int) -> Image.Image:
    """Red | green | blue vertical stripes: green covers the middle half of the width."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 4, 0] = 255
    a[:, w // 4 : 3 * w // 4, 1] = 255
    a[:, 3 * w // 4 :, 2] = 255
    return Image.fromarray(a)


def test_image_folder_loads_sorted_resized_centre_crops(tmp_path):
    stripes(40, 20).save(tmp_path / "a.png")
    stripes(40, 20).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "b.JPG", quality=98)  # 20x40
    (tmp_path / "sub").mkdir()
    Image.new("L", (30, 30), 0).save(tmp_path / "sub" / "c.bmp")  # grayscale -> RGB
    Image.new("RGBA", (25, 50), (255, 255, 255, 0)).save(tmp_path / "sub" / "d.webp")
    (tmp_path / "notes.txt").write_text("not an image")

    ds = D.ImageFolder(tmp_path, size=20)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["a.png", "b.JPG", "sub/c.bmp", "sub/d.webp"]
    x = D.image_folder(tmp_path, size=20)
    assert_image_tensor(x, (4, 3, 20, 20))
    assert torch.equal(x[0], ds[0])
    # a.png is 40x20: no resize, the centre crop is columns 10..29, exactly the green stripe
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
    assert torch.equal(x[0], green.expand(3, 20, 20))
    assert (x[1, :, 1:-1] - green).abs().max() < 0.1  # portrait, horizontal stripes; JPEG
    assert (x[1, :, [0, -1]] - green).abs().max() < 0.8  # blurs the stripes' boundaries
    assert (x[2] == -1).all()  # black
    assert (x[3] == 1).all()  # white, alpha dropped


def test_image_folder_downscales_short_side_then_crops(tmp_path):
    stripes(160, 80).save(tmp_path / "wide.png")
    x = D.image_folder(tmp_path, size=16)[0]  # resized to 32x16, crop columns 8..23 = green
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
    assert (x[:, :, 1:-1] - green).abs().max() < 0.02  # the interior is green
    assert (x[:, :, [0, -1]] - green).abs().max() < 0.2  # the edges blend a little with red/blue


def test_image_folder_class_subfolders_give_sorted_labels(tmp_path):
    colours = {"b_green": (0, 255, 0), "a_red": (255, 0, 0), "c_blue": (0, 0, 255)}
    for name, rgb in colours.items():
        (tmp_path / name / "deeper").mkdir(parents=True)
        Image.new("RGB", (8, 8), rgb).save(tmp_path / name / "1.png")
        Image.new("RGB", (8, 8), rgb).save(tmp_path / name / "deeper" / "2.png")  # any depth counts
    ds = D.ImageFolder(tmp_path, size=8, class_subfolders=True)
    assert ds.classes == ["a_red", "b_green", "c_blue"] and len(ds) == 6
    for i in range(len(ds)):
        x, y = ds[i]
        assert y.dtype == torch.int64 and y.shape == ()
        assert x[int(y), 0, 0] == 1.0  # red images have label 0, green 1, blue 2
    assert isinstance(D.ImageFolder(tmp_path, size=8)[0], torch.Tensor)  # without: images only
    Image.new("RGB", (8, 8)).save(tmp_path / "stray.png")
    with pytest.raises(DataError, match="stray.png is not inside a class folder"):
        D.ImageFolder(tmp_path, size=8, class_subfolders=True)


def test_captions_beside_the_images(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  a red\n square  \n")
    (tmp_path / "b.txt").write_text("")
    files = D.list_images(tmp_path)
    assert D.read_captions(files[:1]) == ["a red square"]  # whitespace collapsed
    with pytest.raises(DataError, match="b.txt is empty"):
        D.read_captions(files)
    (tmp_path / "b.txt").unlink()
    with pytest.raises(DataError, match="b.png has no caption: write it to .*b.txt"):
        D.read_captions(files)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*point image_folder at a folder of images"):
        D.image_folder(tmp_path / "missing", size=8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is not a directory"):
        D.image_folder(tmp_path / "file.png", size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no images \(\.png, \.jpg.*found in .*empty"):
        D.image_folder(empty, size=8)
    assert issubclass(DataError, ValueError)


def test_image_folder_corrupt_files_name_the_file(tmp_path):
    stripes(8, 8).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        D.image_folder(tmp_path, size=8)
    (tmp_path / "bad.png").unlink()
    stripes(64, 64).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:300])  # truncated
    with pytest.raises(DataError, match=r"cut\.jpg"):
        D.image_folder(tmp_path, size=8)


def test_image_folder_in_a_dataloader(tmp_path):
    for i in range(5):
        stripes(12 + i, 10).save(tmp_path / f"{i}.png")
    loader = torch.utils.data.DataLoader(D.ImageFolder(tmp_path, 8), batch_size=2)
    assert [b.shape for b in loader] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]


# -----------------------------------------------------------------------------
# batches

def test_batches_cover_every_index_once_per_epoch():
    idx = torch.arange(105)
    out = list(D.batches(idx, idx * 2, batch_size=10, seed=0, epochs=2))
    assert len(out) == 20  # drop_last: 10 full batches per epoch
    for i, j in out:
        assert torch.equal(j, i * 2)  # rows stay aligned across tensors
    for epoch in (out[:10], out[10:]):
        seen = torch.cat([i for i, _ in epoch])
        assert len(seen) == 100 and len(set(seen.tolist())) == 100
    full = list(D.batches(idx, batch_size=10, drop_last=False, epochs=1))
    assert [len(b) for (b,) in full] == [10] * 10 + [5]
    assert sorted(torch.cat([b for (b,) in full]).tolist()) == list(range(105))


def test_batches_deterministic_and_infinite():
    x = torch.randn(50, 3)
    a = [b for (b,) in itertools.islice(D.batches(x, batch_size=8, seed=4), 20)]
    b = [b for (b,) in itertools.islice(D.batches(x, batch_size=8, seed=4), 20)]
    c = [b for (b,) in itertools.islice(D.batches(x, batch_size=8, seed=5), 20)]
    assert len(a) == 20  # runs past the first epoch (6 batches)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_batches_errors():
    with pytest.raises(ValueError, match="differ in length"):
        next(D.batches(torch.zeros(4), torch.zeros(5), batch_size=2))
    with pytest.raises(ValueError, match="batch_size"):
        next(D.batches(torch.zeros(4), batch_size=8))
