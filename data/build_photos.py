"""Rebuild data/photos/ from public-domain / CC0 images that ship with scikit-image and matplotlib.

    pip install scikit-image matplotlib
    python data/build_photos.py

Each source is converted to RGB (the three grayscale textures are copied into all three
channels), resized with Lanczos so its shorter side is SHORT_SIDE pixels, and saved as a
high-quality JPEG (quality 95, no chroma subsampling). Licences: see data/README.md.
"""

import importlib.util
from pathlib import Path

from PIL import Image

SHORT_SIDE = 288  # big enough for 64 px crops at several scales, small enough for git
QUALITY = 95
OUT = Path(__file__).resolve().parent / "photos"

# name -> (package, path inside the package); all public domain or CC0, see data/README.md
SOURCES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
}


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{name} is not installed; run `pip install {name}` first")
    return Path(spec.origin).parent


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.jpg"):
        old.unlink()
    total = 0
    for name, (package, rel) in SOURCES.items():
        img = Image.open(package_dir(package) / rel).convert("RGB")
        w, h = img.size
        scale = SHORT_SIDE / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
        dst = OUT / f"{name}.jpg"
        img.save(dst, quality=QUALITY, subsampling=0, optimize=True)
        total += dst.stat().st_size
        print(f"{dst.name:24s} {img.size[0]}x{img.size[1]}  {dst.stat().st_size / 1e3:6.1f} kB")
    print(f"total {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
