"""Checkpoints: atomic, verified on load, safe against pickled code, robust to a full disk."""

import errno
import hashlib
import io
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from minildm import checkpoint as ckpt
from minildm.checkpoint import CheckpointError


def _save(root, step, value=1.0, keep_last=3):
    model = {"w": torch.full((3, 4), value), "b": torch.arange(4.0)}
    ema = {"params.w": torch.zeros(3, 4)}
    state = {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
             "rng": ckpt.rng_state()}
    return ckpt.write_checkpoint(root, step, {"steps": 10, "unet": {"ch": 8}}, model, ema, state, keep_last)


def _snapshot(root):
    """Every file under root and its bytes."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _save(root, step, value=step)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000000004", "step_000000006", "step_000000008"]
    assert ckpt.latest(tmp_path).name == "step_000000008"  # from the run folder
    c = ckpt.read_checkpoint(tmp_path)
    assert c.step == 8 and c.config["unet"]["ch"] == 8
    assert torch.equal(c.model["w"], torch.full((3, 4), 8.0)) and torch.equal(c.ema["params.w"], torch.zeros(3, 4))
    assert torch.equal(c.state["optimizer"]["state"][0]["exp_avg"], torch.ones(2))


def test_latest_ignores_incomplete_folders(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    (root / ".tmp-step_000000004-123").mkdir()  # a save that was killed
    (root / "step_000000006").mkdir()  # no manifest: not a checkpoint
    assert ckpt.latest(tmp_path).name == "step_000000002"
    assert ckpt.latest(tmp_path / "nothing") is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.read_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.read_checkpoint(tmp_path / "missing")


def test_truncated_file_is_named(tmp_path):
    path = _save(tmp_path, 1)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        ckpt.read_checkpoint(path)


def test_corrupt_file_is_named(tmp_path):
    path = _save(tmp_path, 1)
    f = path / "state.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="state.pt is corrupt"):
        ckpt.read_checkpoint(path)


class _Exploit:
    """Unpickling this would create a marker file (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = _save(tmp_path / "run", 1)
    buf = io.BytesIO()
    torch.save({"step": 1, "payload": _Exploit(marker)}, buf)
    (path / "state.pt").write_bytes(buf.getvalue())
    # the low-level reader refuses it ...
    with pytest.raises(CheckpointError, match="refusing to load .*state.pt.*pickled object"):
        ckpt.load_state(path / "state.pt")
    # ... and so does a full load whose manifest an attacker made consistent
    manifest = json.loads((path / "MANIFEST.json").read_text())
    data = (path / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.read_checkpoint(path)
    assert not marker.exists()
    # sanity: plain pickle really would have run it
    pickle.loads(pickle.dumps(_Exploit(marker))).close()
    assert marker.exists()


def test_full_disk_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    before = _snapshot(root)
    real_write = ckpt._write_file
    calls = []

    def write_then_fail(path, data):
        calls.append(path.name)
        if len(calls) == 2:  # the second file: write half of it, then the disk is full
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", write_then_fail)
    with pytest.raises(OSError) as e:
        _save(root, 4)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in root.iterdir()) == ["step_000000002"]  # no partial folder visible
    assert _snapshot(root) == before
    assert ckpt.read_checkpoint(tmp_path).step == 2


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # plain values and tensors only


def test_write_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    _save(tmp_path, 1)
    assert len(synced) >= 6  # 5 files + the manifest (+ the folders)


def test_weights_of_another_model_shape_are_named(tmp_path):
    net = torch.nn.Linear(3, 2)
    ckpt.load_weights(net, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, tmp_path)
    with pytest.raises(CheckpointError, match="does not fit the model.*size mismatch for weight"):
        ckpt.load_weights(net, {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}, tmp_path)


def test_save_atomic_round_trips_and_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "sub" / "latents.pt"
    ckpt.save_atomic({"latents": torch.arange(6.0), "seed": 3}, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["latents"], torch.arange(6.0)) and loaded["seed"] == 3
    before = path.read_bytes()
    with pytest.raises(Exception):
        ckpt.save_atomic({"f": lambda: 0}, path)  # a lambda cannot be pickled: torch.save fails
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["latents.pt"]  # no temporary file left
