"""Checkpoints that survive a crash, a full disk and a hostile file.

A checkpoint is a directory ``RUN_DIR/checkpoints/step_000123/`` holding

    model.safetensors   the network's weights (safetensors: no code can hide in it)
    ema.safetensors     the EMA's shadow weights, if the run keeps an EMA
    state.pt            optimizer state, step, RNG states, data position: tensors and plain
                        values only, read with torch.load(weights_only=True)
    config.json         the TrainConfig of the run
    <extra files>       what a stage needs beside them, e.g. first_stage.pt (the frozen
                        autoencoder of a latent run, weights_only format) or
                        discriminator.safetensors (the first stage's patch discriminator)
    MANIFEST.json       size and sha256 of each file above; written last

Atomicity. Everything is written into a hidden ``.tmp-step_000123-PID/`` beside it, each
file flushed and fsync'd, the manifest last; then one os.replace renames the directory to
``step_000123`` and the parent directory is fsync'd. A directory named ``step_*`` is
therefore complete: a crash, a kill or a full disk leaves at most a ``.tmp-*`` folder,
which is invisible to `latest` and removed by the next `write_checkpoint`. Only after the new checkpoint
is in place are the oldest ones beyond `keep_last` deleted.

Loading checks every file against the manifest (a truncated or corrupt file is named),
reads weights with safetensors and the rest with weights_only=True: a file holding a
pickled object that would run code is refused with a `CheckpointError`, never executed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

MANIFEST = "MANIFEST.json"
STANDARD_FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.json")
PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, unsafe or incompatible; the message names it."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it was, its step, and what it held."""

    path: Path
    step: int
    config: dict  # the run's TrainConfig as JSON (`minildm.config.to_dict`)
    model: dict[str, Tensor]  # the network's state_dict
    ema: dict[str, Tensor] | None  # the EMA's shadow parameters and buffers, or None
    state: dict  # optimizer, RNG states, data position, EMA counters (see minildm.resume)
    extra: dict[str, bytes] = field(default_factory=dict)  # the extra files' verified bytes, by name


# ----------------------------------------------------------------------------------------
# writing

def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync them: after this returns, the data is on disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename inside it is durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: object, path: str | Path) -> None:
    """torch.save `obj` (tensors, numbers, strings: what `torch.load(weights_only=True)` reads)
    to a temporary file beside `path`, fsync it, then os.replace it onto `path`: a reader
    (or a crash) never sees half a file, and an existing file stays intact until the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        _write_file(tmp, buffer.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies that share no storage (safetensors refuses shared ones)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def write_checkpoint(root: str | Path, step: int, config: dict, model: dict[str, Tensor],
         ema: dict[str, Tensor] | None, state: dict, keep_last: int = 3,
         extra: dict[str, bytes] | None = None) -> Path:
    """Write a complete checkpoint ``root/step_XXXXXXXXX`` atomically, then keep the last
    `keep_last`. `extra`: more files {name: bytes}, covered by the manifest like the rest.
    On any error (e.g. OSError ENOSPC) the partial folder is removed, the existing
    checkpoints are untouched, and the error is raised again."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    files = {"model.safetensors": safetensors.torch.save(_cpu(model)),
             "config.json": json.dumps(config, indent=2).encode()}
    if ema is not None:
        files["ema.safetensors"] = safetensors.torch.save(_cpu(ema))
    buf = io.BytesIO()
    torch.save(state, buf)
    files["state.pt"] = buf.getvalue()
    for name, data in (extra or {}).items():
        if name in files or name == MANIFEST or "/" in name:
            raise ValueError(f"extra checkpoint file name {name!r} is reserved or not a plain name")
        files[name] = data
    manifest = {"step": step, "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                        for name, data in files.items()}}
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_file(tmp / name, data)
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run's last step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------
# finding

def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under `root` (a checkpoints folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / MANIFEST).is_file():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``run_dir/checkpoints/step_*``), or None."""
    run_dir = Path(run_dir)
    found = complete_checkpoints(run_dir / "checkpoints") or complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its newest checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if path.is_dir():
        found = latest(path)
        if found is not None:
            return found
        raise CheckpointError(f"no complete checkpoint (a step_* folder with {MANIFEST}) in {path}")
    raise CheckpointError(f"checkpoint {path} does not exist")


# ----------------------------------------------------------------------------------------
# reading

def load_tensors(path: str | Path, data: bytes | None = None) -> dict[str, Tensor]:
    """Read a safetensors file; a damaged one raises CheckpointError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes() if data is None else data
        return safetensors.torch.load(data)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def load_state(path: str | Path, data: bytes | None = None) -> dict:
    """Read a state file with torch.load(weights_only=True): tensors and plain values only.
    A pickled object that would run code is refused, not executed."""
    path = Path(path)
    try:
        data = path.read_bytes() if data is None else data
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if str(e) else "UnpicklingError"
        raise CheckpointError(f"refusing to load {path}: it holds a pickled object that could run code "
                              f"({reason})") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _verified(path: Path, name: str, entry: dict) -> bytes:
    """The bytes of one checkpoint file, checked against its manifest entry."""
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint file {f} is missing")
    data = f.read_bytes()
    if len(data) != entry["bytes"]:
        raise CheckpointError(f"checkpoint file {f} is truncated or damaged: {len(data)} bytes, "
                              f"expected {entry['bytes']}; delete {path} to resume from the previous one")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 differs from {MANIFEST}); "
                              f"delete {path} to resume from the previous one")
    return data


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint folder (or a run folder's newest checkpoint), on the CPU."""
    path = resolve_checkpoint(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        entries = manifest["files"]
    except Exception as e:
        raise CheckpointError(f"cannot read {path / MANIFEST}: {type(e).__name__}: {e}") from None
    data = {name: _verified(path, name, entry) for name, entry in entries.items()}
    try:
        config = json.loads(data["config.json"])
    except Exception as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
    model = load_tensors(path / "model.safetensors", data["model.safetensors"])
    ema = load_tensors(path / "ema.safetensors", data["ema.safetensors"]) if "ema.safetensors" in data else None
    state = load_state(path / "state.pt", data["state.pt"])
    extra = {k: v for k, v in data.items() if k not in STANDARD_FILES}
    return Checkpoint(path=path, step=int(manifest["step"]), config=config, model=model, ema=ema, state=state,
                      extra=extra)


# ----------------------------------------------------------------------------------------
# random number generators

def rng_state() -> dict:
    """The states of torch's CPU (and CUDA) generators, numpy's and Python's `random`,
    as tensors and plain values (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["mt"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(module: torch.nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    """module.load_state_dict(tensors), with a mismatch (a checkpoint from another version of
    the model) reported as a CheckpointError naming the first differing tensors."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{where} does not fit the model its config builds: "
                              f"{'; '.join(details[:2]) or e}") from None
