"""Figures for the lessons: image grids, noising strips, 2-D scatter and density plots,
trajectories, and animations that a plain notebook viewer still shows (GIF)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.axes import Axes
from torch import Tensor


def to_image(x: Tensor) -> np.ndarray:
    """One image (C, H, W) in [-1, 1] to an array (H, W) or (H, W, 3) in [0, 1] for imshow."""
    x = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def make_grid(x: Tensor, nrow: int = 8, pad: int = 1) -> Tensor:
    """Tile a batch (B, C, H, W) into one image (C, rows (H + pad), nrow (W + pad)), pad value 1 (white)."""
    B, C, H, W = x.shape
    rows = (B + nrow - 1) // nrow
    grid = x.new_ones(C, rows * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = x[i]
    return grid


def show_images(x: Tensor, nrow: int = 8, title: str | None = None, ax: Axes | None = None,
                scale: float = 0.5) -> Axes:
    """Show a batch (B, C, H, W) in [-1, 1] as a grid."""
    grid = to_image(make_grid(x.detach().float().cpu(), nrow))
    if ax is None:
        h, w = grid.shape[:2]
        _, ax = plt.subplots(figsize=(scale * w / 16, scale * h / 16))
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def noising_strip(frames: Sequence[Tensor], labels: Sequence[str], title: str | None = None,
                  scale: float = 2.0) -> plt.Figure:
    """A row per image, a column per noise level: frames[j] is (B, C, H, W) at level labels[j].

    Drawn as one image at `scale` screen pixels per image pixel, so that stored notebooks
    stay small (noise does not compress: upsampled noise costs megabytes).
    """
    B, C, H, W = frames[0].shape
    columns = torch.stack([f.detach().float().cpu() for f in frames], dim=1)  # (B, levels, C, H, W)
    grid = to_image(make_grid(columns.flatten(0, 1), nrow=len(frames)))
    dpi = plt.rcParams["figure.dpi"]
    fig, ax = plt.subplots(figsize=(scale * grid.shape[1] / dpi, scale * grid.shape[0] / dpi + 0.35))
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([(W + 1) * j + 1 + W / 2 for j in range(len(frames))], labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def scatter2d(points: Tensor, ax: Axes | None = None, title: str | None = None, lim: float = 3.0,
              s: float = 2.0, alpha: float = 0.5, color: str | None = None, label: str | None = None) -> Axes:
    """Scatter plot of 2-D points (N, 2) on a square canvas [-lim, lim]^2."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3.5, 3.5))
    p = points.detach().float().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=s, alpha=alpha, color=color, label=label)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def density2d(log_prob: Callable[[Tensor], Tensor], ax: Axes | None = None, lim: float = 3.0, n: int = 150,
              title: str | None = None) -> Axes:
    """Heat map of exp(log_prob(x)) over a grid of n x n points on [-lim, lim]^2."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3.5, 3.5))
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    with torch.no_grad():
        density = log_prob(torch.stack([xx.flatten(), yy.flatten()], dim=1)).exp().reshape(n, n)
    ax.imshow(density.cpu().numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def trajectories2d(traj: Tensor, ax: Axes | None = None, n: int = 50, lim: float = 3.0,
                   title: str | None = None) -> Axes:
    """Paths of n points through the reverse process: traj is (steps, N, 2), start grey, end red."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3.5, 3.5))
    p = traj[:, :n].detach().float().cpu().numpy()
    for k in range(p.shape[1]):
        ax.plot(p[:, k, 0], p[:, k, 1], lw=0.6, color="tab:blue", alpha=0.5)
    ax.scatter(p[0, :, 0], p[0, :, 1], s=10, color="grey", label="start: noise", zorder=3)
    ax.scatter(p[-1, :, 0], p[-1, :, 1], s=10, color="tab:red", label="end: sample", zorder=3)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    if title:
        ax.set_title(title)
    return ax


def animate(fig: plt.Figure, update: Callable[[int], None], frames: int, fps: int = 8) -> bytes:
    """Render `update(i)` for i in range(frames) as a looping GIF and return its bytes.

    Show it with `IPython.display.Image(data=gif, format="gif")`: a GIF is stored in the
    notebook as an image, so a plain viewer (GitHub, nbviewer) plays it without JavaScript.
    """
    anim = FuncAnimation(fig, update, frames=frames)
    with tempfile.TemporaryDirectory() as tmp:  # PillowWriter writes to a path
        path = Path(tmp) / "anim.gif"
        anim.save(path, writer=PillowWriter(fps=fps))
        gif = path.read_bytes()
    plt.close(fig)
    return gif


# -----------------------------------------------------------------------------
# a training run's curves (python -m minildm plot RUN_DIR)

def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file (log.jsonl, metrics.jsonl of a run); [] if it does not exist.
    A last line cut short by a kill is skipped."""
    import json
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def run_curves(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} for every number of a run's log.jsonl and metrics.jsonl (the
    metrics prefixed "val/"), except the wall-clock "time". A resumed run may log a step
    twice; the later value wins."""
    curves: dict[str, dict[int, float]] = {}
    for prefix, name in (("", "log.jsonl"), ("val/", "metrics.jsonl")):
        for r in read_jsonl(Path(run_dir) / name):
            for k, v in r.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    curves.setdefault(prefix + k, {})[int(r["step"])] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in curves.items()}


def plot_run(run_dir: str | Path, keys: Sequence[str] | None = None, ncols: int = 3) -> plt.Figure:
    """One small panel per curve of `run_curves` (or only `keys`), against the step; losses
    that stay positive on a log scale. Raises FileNotFoundError if the run logged nothing."""
    curves = run_curves(run_dir)
    if not curves:
        raise FileNotFoundError(f"no log.jsonl or metrics.jsonl with numbers in {run_dir}")
    names = list(keys) if keys is not None else sorted(curves, key=lambda k: (k.startswith("val/"), k != "loss", k))
    missing = [k for k in names if k not in curves]
    if missing:
        raise KeyError(f"{', '.join(missing)} not logged; the run has {', '.join(sorted(curves))}")
    rows = (len(names) + ncols - 1) // ncols
    fig, axes = plt.subplots(rows, ncols, figsize=(3.2 * ncols, 2.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = curves[name]
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        if ("loss" in name or name in ("rec", "kl", "vq", "perceptual")) and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    return fig
