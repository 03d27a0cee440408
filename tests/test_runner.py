"""The run loop and the command line: exact resume after SIGKILL, DDP = one process, and
one clear line + exit code 2 for every user mistake, with existing checkpoints untouched."""

import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from helpers import finished_run, write_config
from minildm import checkpoint as ckpt
from minildm.__main__ import main
from minildm.config import load_config
from minildm.rundata import ResumableBatches
from minildm.runner import lr_at, run

MICRO = '''
from minildm.autoencoder import AutoencoderConfig
from minildm.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig
from minildm.unet import UNetConfig

config = TrainConfig(
    stage="diffusion", steps=6, run_dir="runs/micro",
    data=DataConfig(source="digits", image_size=28, batch_size=8),
    optim=OptimConfig(lr=1e-3, warmup_steps=2),
    unet=UNetConfig(in_ch=1, out_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                    heads=1, groups=4, image_size=28),
    diffusion=DiffusionConfig(T=50),
    autoencoder=AutoencoderConfig(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_ch=2, groups=4,
                                  attn_mid=False),
    ema_decay=0.9, num_threads=1, log_every=1, ckpt_every=2, progress=False, n_samples=4, sample_steps=2)
'''


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> str:
    return write_config(tmp_path_factory, MICRO)


@pytest.fixture(scope="module")
def base_run(cfg, tmp_path_factory) -> Path:
    """A finished 6-step diffusion run with checkpoints at steps 2, 4 and 6."""
    return finished_run(tmp_path_factory, cfg, "base")


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def snapshot(run_dir: Path) -> dict:
    """Every checkpoint file's bytes."""
    root = run_dir / "checkpoints"
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fails_with(capsys, argv, *words) -> str:
    """Run the CLI, expect exit code 2 and one line on stderr containing `words`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = [l for l in err if l.startswith("error:")]
    assert len(line) == 1, err
    for w in words:
        assert w in line[0], line[0]
    return line[0]


def same_weights(a: Path, b: Path) -> bool:
    ca, cb = ckpt.read_checkpoint(a), ckpt.read_checkpoint(b)
    return (ca.step == cb.step and all(torch.equal(ca.model[k], cb.model[k]) for k in ca.model)
            and all(torch.equal(ca.ema[k], cb.ema[k]) for k in ca.ema))


# ----------------------------------------------------------------------------------------
# the pieces

def test_lr_warmup_then_cosine(cfg):
    c = load_config(cfg, ["--steps=100", "--optim.warmup_steps=10", "--optim.min_lr_ratio=0.1"])
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_batches_partition_the_global_batch_and_resume():
    one = iter(ResumableBatches(20, 8, 0, 1, seed=0))
    r0, r1 = iter(ResumableBatches(20, 8, 0, 2, seed=0)), iter(ResumableBatches(20, 8, 1, 2, seed=0))
    stream = [next(one) for _ in range(5)]  # crosses epochs (2 batches each)
    assert all(len(set(b)) == 8 for b in stream)
    assert [next(r0) + next(r1) for _ in range(5)] == stream
    assert [next(iter(ResumableBatches(20, 8, 0, 1, seed=0, start=3)))] == [stream[3]]


def test_run_writes_log_samples_metrics(base_run):
    log = [json.loads(l) for l in (base_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {"loss", "lr", "images_per_s", "peak_mem_mb", "grad_norm"} <= log[0].keys()
    assert [p.name for p in ckpt.complete_checkpoints(base_run / "checkpoints")] == [
        "step_000000002", "step_000000004", "step_000000006"]
    assert (base_run / "samples" / "step_000000006.png").is_file()
    assert "val_loss" in json.loads((base_run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("extra", [[], ["--quantizer.num_codes=16", "--quantizer.dim=2"]], ids=["kl", "vq"])
def test_autoencoder_stage_and_evaluate(cfg, tmp_path, capsys, extra):
    run_dir = tmp_path / "ae"
    assert main(["train", cfg, "--stage=autoencoder", f"--run_dir={run_dir}", "--steps=3", *extra]) == 0
    metrics = json.loads((run_dir / "metrics.jsonl").read_text())
    assert {"psnr", "ssim"} <= metrics.keys()
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 500 and out["psnr"] > 0
    fails_with(capsys, ["sample", str(run_dir)], "first-stage autoencoder")


def test_sample_command(base_run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", str(base_run), "--n", "6", "--out", str(out), "--steps", "3"]) == 0
    assert Image.open(out).size == (8 * 29 + 1, 1 * 29 + 1)
    assert main(["sample", str(base_run), "--n", "2", "--out", str(out), "--sampler", "heun", "--steps", "2"]) == 0
    assert main(["sample", str(base_run), "--n", "2", "--out", str(out), "--sampler", "heun_edm", "--steps", "2"]) == 0


def test_help_for_every_command(capsys):
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"], ["evaluate", "--help"], ["plot", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "--resume" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# exact resume and DDP

def test_sigkill_then_resume_equals_uninterrupted_run(cfg, tmp_path):
    args = ["--steps=30", "--ckpt_every=1", "--keep_last=2", "--log_every=5"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "minildm", "train", cfg, f"--run_dir={killed}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    kill_after = random.Random().randint(3, 12)  # a random-ish step
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                found = ckpt.latest(killed)
            except OSError:  # a folder deleted by keep_last while we looked
                found = None
            if found is not None and int(found.name[5:]) >= kill_after:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = ckpt.read_checkpoint(killed).step
    assert 3 <= killed_at < 30
    assert main(["train", cfg, f"--run_dir={killed}", *args, "--resume"]) == 0
    assert main(["train", cfg, f"--run_dir={tmp_path / 'straight'}", *args]) == 0
    assert same_weights(killed, tmp_path / "straight")


def test_resume_of_a_finished_run_changes_nothing(run_copy, cfg):
    before = snapshot(run_copy)
    assert main(["train", cfg, f"--run_dir={run_copy}", "--resume"]) == 0
    assert snapshot(run_copy) == before


def _ddp_worker(rank: int, world: int, port: int, cfg: str, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    run(load_config(cfg, [f"--run_dir={run_dir}", "--steps=3", "--ckpt_every=3"]))


def test_ddp_two_processes_match_one(cfg, tmp_path):
    """Two gloo processes with 4 images each = one process with the global batch of 8."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path / "ddp")), nprocs=2)
    run(load_config(cfg, [f"--run_dir={tmp_path / 'one'}", "--steps=3", "--ckpt_every=3"]))
    a, b = ckpt.read_checkpoint(tmp_path / "ddp"), ckpt.read_checkpoint(tmp_path / "one")
    assert a.step == b.step == 3
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5)
    assert [p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()] == ["step_000000003"]


# ----------------------------------------------------------------------------------------
# user mistakes: one line, exit code 2, checkpoints untouched

def test_unknown_key_and_wrong_type(run_copy, cfg, capsys):
    before = snapshot(run_copy)
    fails_with(capsys, ["train", cfg, f"--run_dir={run_copy}", "--resume", "--unet.chmult=1,2"],
               "unknown config key 'unet.chmult'", "did you mean --unet.ch_mult?")
    fails_with(capsys, ["train", cfg, f"--run_dir={run_copy}", "--resume", "--optim.lr=fast"],
               "--optim.lr=fast", "expected float")
    fails_with(capsys, ["train", cfg, f"--run_dir={run_copy}", "--resum"], "did you mean --resume?")
    assert snapshot(run_copy) == before


def test_existing_run_needs_resume(run_copy, cfg, capsys):
    before = snapshot(run_copy)
    fails_with(capsys, ["train", cfg, f"--run_dir={run_copy}", "--steps=8"], "already holds checkpoints", "--resume")
    assert snapshot(run_copy) == before


def _folder_args(tmp_path, path):
    return ["--data.source=folder", f"--data.path={path}", "--unet.in_ch=3", "--unet.out_ch=3",
            f"--run_dir={tmp_path / 'run'}"]


def test_evaluate_a_folder_run_with_the_perceptual_nets_features(cfg, tmp_path, capsys):
    """Diffusion on your images: FID and KID on the photo-trained perceptual net's features,
    against n images of the folder; a folder too small for FID is one clear line."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(70):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    run_dir = tmp_path / "run"
    assert main(["train", cfg, *_folder_args(tmp_path, folder), "--steps=2"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--n", "70", "--steps", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["features"] == "perceptual net (photo crops)" and out["n"] == 70
    assert out["fid"] > 0 and np.isfinite(out["kid"])
    for f in sorted(folder.iterdir())[10:]:
        f.unlink()
    fails_with(capsys, ["evaluate", str(run_dir), "--n", "70", "--steps", "2"], "holds 10 images", "65 or more")


def test_missing_empty_and_corrupt_image_folder(cfg, tmp_path, capsys):
    fails_with(capsys, ["train", cfg, *_folder_args(tmp_path, tmp_path / "nope")], "does not exist")
    (tmp_path / "empty").mkdir()
    fails_with(capsys, ["train", cfg, *_folder_args(tmp_path, tmp_path / "empty")], "no images", "empty")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(folder / f"ok_{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    fails_with(capsys, ["train", cfg, *_folder_args(tmp_path, folder)], "broken.png")


def test_truncated_checkpoint(run_copy, cfg, capsys):
    f = ckpt.latest(run_copy) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    before = snapshot(run_copy)
    fails_with(capsys, ["train", cfg, f"--run_dir={run_copy}", "--steps=8", "--resume"],
               "step_000000006/model.safetensors is truncated")
    fails_with(capsys, ["sample", str(run_copy)], "truncated")
    assert snapshot(run_copy) == before


def test_incompatible_resume_names_the_keys(run_copy, cfg, capsys):
    before = snapshot(run_copy)
    fails_with(capsys, ["train", cfg, f"--run_dir={run_copy}", "--steps=8", "--resume", "--unet.ch=16"],
               "cannot resume", "unet.ch: 8 -> 16")
    assert snapshot(run_copy) == before


def test_pickled_code_in_a_checkpoint_is_refused(run_copy, cfg, capsys, tmp_path):
    marker = tmp_path / "pwned"
    path = ckpt.latest(run_copy)
    buf = io.BytesIO()
    torch.save({"step": 6, "x": _Exploit(str(marker))}, buf)
    data = buf.getvalue()
    (path / "state.pt").write_bytes(data)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    fails_with(capsys, ["train", cfg, f"--run_dir={run_copy}", "--steps=8", "--resume"], "refusing to load")
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_copy, cfg, capsys):
    before = snapshot(run_copy)
    argv = ["train", cfg, f"--run_dir={run_copy}", "--steps=12", "--resume", "--debug_nan_step=9", "--keep_last=10"]
    fails_with(capsys, argv, "non-finite loss", "at step 9", "step_000000008")
    after = snapshot(run_copy)
    assert {k: v for k, v in after.items() if k in before} == before
    assert ckpt.latest(run_copy).name == "step_000000008"
    assert ckpt.read_checkpoint(run_copy).step == 8


def test_full_disk_while_saving(cfg, tmp_path, capsys, monkeypatch):
    real_write = ckpt._write_file
    saves = []

    def write(path, data):
        if path.name == "model.safetensors":
            saves.append(path)
        if len(saves) == 2:  # the second checkpoint: half a file, then no space
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", write)
    run_dir = tmp_path / "run"
    fails_with(capsys, ["train", cfg, f"--run_dir={run_dir}"], "No space left on device", "step_000000002")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000000002"]
    assert ckpt.read_checkpoint(run_dir).step == 2


def test_bf16_accumulation_and_workers_run(cfg, tmp_path):
    run_dir = tmp_path / "opts"
    assert main(["train", cfg, f"--run_dir={run_dir}", "--steps=2", "--bf16", "--channels_last", "--optim.accumulate=2",
                 "--data.num_workers=1", "--optim.grad_clip=None", "--ema_decay=None"]) == 0
    c = ckpt.read_checkpoint(run_dir)
    assert c.step == 2 and c.ema is None
    fails_with_code = main(["train", cfg, f"--run_dir={tmp_path / 'x'}", "--optim.accumulate=3"])
    assert fails_with_code == 2  # 8 images do not split into 3 micro-batches
