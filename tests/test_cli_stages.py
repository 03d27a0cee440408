"""The stages beyond pixel diffusion, through the command line: latent diffusion on a shipped
first stage, class and text conditioning with guidance, the first stage with its patch
discriminator; exact resume of each; and one clear line (exit code 2) for a bad first stage."""

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import finished_run, write_config
from minildm import checkpoint as ckpt
from minildm.__main__ import main
from minildm.autoencoder import load_autoencoder, measure_scale_factor
from minildm.data import DATA_DIR, load_digits

AE = DATA_DIR / "checkpoints" / "ae_digits_f4.pt"  # KL f=4, 28x28x1 -> 7x7x4

MICRO = f'''
from minildm.autoencoder import AutoencoderConfig
from minildm.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig
from minildm.firststage import FirstStageLoss
from minildm.losses import PatchDiscriminatorConfig
from minildm.text import TextEncoderConfig
from minildm.unet import UNetConfig

config = TrainConfig(
    stage="diffusion", steps=4, run_dir="runs/micro", first_stage={str(AE)!r},
    data=DataConfig(source="digits", image_size=28, batch_size=8, shapes_count=64),
    optim=OptimConfig(lr=1e-3, warmup_steps=1),
    unet=UNetConfig(in_ch=4, out_ch=4, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                    heads=1, groups=4, image_size=7),
    diffusion=DiffusionConfig(T=50, prediction="v"),
    autoencoder=AutoencoderConfig(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_ch=2, groups=4,
                                  attn_mid=False),
    loss=FirstStageLoss(disc_weight=0.5, disc_start=2, learn_logvar=True,
                        discriminator=PatchDiscriminatorConfig(in_ch=1, ndf=8, n_layers=1)),
    text=None,
    ema_decay=0.9, num_threads=1, log_every=1, ckpt_every=2, progress=False, n_samples=4, sample_steps=2)
'''
TEXT = ["--data.source=shapes", "--data.image_size=32", "--unet.image_size=8", "--unet.context_dim=16",
        "--unet.attn_resolutions=8", "--text.dim=16", "--text.depth=1", "--text.heads=2",
        f"--first_stage={DATA_DIR / 'checkpoints' / 'ae_photos_f4.pt'}"]
AE_STAGE = ["--stage=autoencoder", "--ema_decay=None"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> str:
    return write_config(tmp_path_factory, MICRO)


@pytest.fixture(scope="module")
def latent_run(cfg, tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory, cfg, "latent")


def fails_with(capsys, argv, *words) -> str:
    """Run the CLI, expect exit code 2 and one line on stderr containing `words`."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def checkpoint_bytes(run_dir: Path) -> dict:
    """Every file of the newest checkpoint except the manifest (which records the same hashes)."""
    path = ckpt.latest(run_dir)
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name not in ("MANIFEST.json", "config.json")}


def same_run(a: Path, b: Path) -> None:
    ca, cb = ckpt.read_checkpoint(a), ckpt.read_checkpoint(b)
    assert ca.step == cb.step
    for k in ca.model:
        assert torch.equal(ca.model[k], cb.model[k]), k
    for name in ca.extra:
        assert ca.extra[name] == cb.extra[name], name


# ----------------------------------------------------------------------------------------
# latent diffusion

def test_latent_run_uses_the_first_stage_and_its_measured_scale(latent_run):
    c = ckpt.read_checkpoint(latent_run)
    stored, _ = load_autoencoder(io.BytesIO(c.extra["first_stage.pt"]))
    shipped, _ = load_autoencoder(AE)
    for k, v in shipped.state_dict().items():  # the frozen first stage, untouched
        if k != "scale_factor":
            assert torch.equal(stored.state_dict()[k], v), k
    x = load_digits("train", 28)[0][:1000]
    expected = measure_scale_factor(shipped, x, generator=torch.Generator().manual_seed(0))
    assert float(stored.scale_factor) == pytest.approx(expected, rel=1e-6)
    assert 0.2 < expected < 5  # a real measurement, not the unmeasured 1.0
    log = [json.loads(line) for line in (latent_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    grid = Image.open(latent_run / "samples" / "step_000000004.png")
    assert grid.size == (8 * 29 + 1, 29 + 1)  # decoded: 28 px digits, not 7 px latents


def test_latent_sample_and_evaluate_commands(latent_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(latent_run), "--n", "3", "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (8 * 29 + 1, 29 + 1)
    capsys.readouterr()
    assert main(["evaluate", str(latent_run), "--n", "80", "--steps", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 80 and metrics["fid"] > 0
    fails_with(capsys, ["evaluate", str(latent_run), "--n", "20"], "--n 20", "65 or more")
    fails_with(capsys, ["sample", str(latent_run), "--label", "3"], "unconditional")


def test_latent_resume_is_exact(latent_run, cfg, tmp_path):
    half = tmp_path / "half"  # stopped by a NaN at step 3, after the checkpoint of step 2
    assert main(["train", cfg, f"--run_dir={half}", "--debug_nan_step=3"]) == 2
    assert main(["train", cfg, f"--run_dir={half}", "--resume"]) == 0
    same_run(half, latent_run)


# ----------------------------------------------------------------------------------------
# conditioning

def test_class_conditional_run_and_guided_samples(cfg, tmp_path, capsys):
    run_dir = tmp_path / "cls"
    assert main(["train", cfg, f"--run_dir={run_dir}", "--steps=2", "--unet.num_classes=10",
                 "--guidance=2", "--n_samples=10"]) == 0
    out = tmp_path / "sevens.png"
    assert main(["sample", str(run_dir), "--n", "2", "--label", "7", "--guidance", "3", "--steps", "2",
                 "--out", str(out)]) == 0
    fails_with(capsys, ["sample", str(run_dir), "--label", "12"], "--label=12", "0..9")
    fails_with(capsys, ["sample", str(run_dir), "--prompt", "a red star"], "use --label, not --prompt")
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'x'}", "--unet.num_classes=10",
                        "--data.source=shapes", "--data.image_size=32", "--unet.image_size=8",
                        f"--first_stage={DATA_DIR / 'checkpoints' / 'ae_photos_f4.pt'}"], "class_subfolders")


def test_class_conditional_run_on_an_image_folder_of_class_subfolders(cfg, tmp_path, capsys):
    """Each subfolder of data.path is a class (sorted names -> 0..K-1): labels reach the UNet
    whether the folder is encoded in the loop or once, and a wrong setup is one clear line."""
    folder = tmp_path / "imgs"
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(["cats", "dogs"]):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(32, 32, 3, generator=g) * 127 + 128 * k).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    base = ["--data.source=folder", f"--data.path={folder}", "--data.image_size=32", "--unet.image_size=8",
            f"--first_stage={DATA_DIR / 'checkpoints' / 'ae_photos_f4.pt'}", "--steps=2"]
    cls = ["--data.class_subfolders=true", "--unet.num_classes=2"]
    for name, extra in [("loop", []), ("once", ["--data.encode_once"])]:
        assert main(["train", cfg, f"--run_dir={tmp_path / name}", *base, *cls, *extra]) == 0
    assert main(["sample", str(tmp_path / "once"), "--n", "2", "--label", "1", "--steps", "2",
                 "--out", str(tmp_path / "dogs.png")]) == 0
    fails_with(capsys, ["sample", str(tmp_path / "once"), "--label", "2"], "--label=2", "0..1")
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'x'}", *base, "--unet.num_classes=2"],
               "--data.class_subfolders=true")
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'x'}", *base, "--data.class_subfolders=true"],
               "--unet.num_classes")
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'x'}", *base, *cls, "--unet.num_classes=3"],
               "2 class subfolders", "--unet.num_classes=2")
    Image.fromarray(pixels).save(folder / "loose.png")
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'x'}", *base, *cls], "loose.png", "class folder")


def test_text_conditional_run_on_captioned_images(cfg, tmp_path, capsys):
    """Each image's caption in a .txt beside it: the run learns its vocabulary from them (kept in
    every checkpoint's config, so `sample --prompt` needs nothing else), encodes the folder
    once with its captions, resumes, and names a missing caption's file."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    captions = ["a red square", "a blue circle on grass", "red red sky", "a dog"]
    for i in range(8):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(captions[i % 4] + "\n")
    text = [a for a in TEXT if not a.startswith("--data.source")]
    run = ["--data.source=folder", f"--data.path={folder}", "--data.captions=true", *text, "--text.vocab_size=8",
           "--data.encode_once", "--guidance=2", "--steps=2"]
    assert main(["train", cfg, f"--run_dir={tmp_path / 'run'}", *run]) == 0
    words = ckpt.read_checkpoint(tmp_path / "run").config["text"]["words"]
    assert words == ["a", "red", "blue", "circle", "dog", "grass"]  # by frequency, then alphabetical
    assert main(["train", cfg, f"--run_dir={tmp_path / 'run'}", *run[:-1], "--steps=3", "--resume"]) == 0
    out = tmp_path / "red.png"
    assert main(["sample", str(tmp_path / "run"), "--n", "2", "--prompt", "a red circle", "--steps", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'x'}", *run[:2], *text], "--data.captions=true")
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'x'}", *run[:3], "--steps=2"], "no text encoder")
    (folder / "3.txt").unlink()
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'x'}", *run], "3.png has no caption", "3.txt")


def test_text_conditional_run_and_prompt(cfg, tmp_path, capsys):
    run_dir = tmp_path / "txt"
    assert main(["train", cfg, f"--run_dir={run_dir}", "--steps=2", *TEXT, "--guidance=2"]) == 0
    c = ckpt.read_checkpoint(run_dir)
    assert any(k.startswith("encoder.") for k in c.model)  # the text encoder is trained and saved
    out = tmp_path / "star.png"
    assert main(["sample", str(run_dir), "--n", "2", "--prompt", "a big red star in the middle",
                 "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).mode == "RGB"
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--n", "8", "--steps", "2"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["n"] == 8 and 0 <= scores["prompt_accuracy_all"] <= scores["prompt_accuracy_color"] <= 1
    fails_with(capsys, ["train", cfg, f"--run_dir={tmp_path / 'y'}", *TEXT, "--unet.context_dim=8"],
               "unet.context_dim=8 must equal text.dim=16")


# ----------------------------------------------------------------------------------------
# the first stage with its discriminator

def test_gan_first_stage_logs_every_term_and_resumes_exactly(cfg, tmp_path):
    straight, half = tmp_path / "straight", tmp_path / "half"
    assert main(["train", cfg, *AE_STAGE, f"--run_dir={straight}"]) == 0
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    keys = {"rec", "kl", "g_adv", "lambda", "d_loss", "logits_real", "logits_fake", "logvar", "loss", "lr"}
    assert keys <= log[0].keys()
    assert log[0]["d_loss"] == 0 and log[2]["d_loss"] > 0  # the discriminator starts at step disc_start=2
    assert "discriminator.safetensors" in ckpt.read_checkpoint(straight).extra
    # stopped at step 4, after the checkpoint of step 3: D and its optimizer have taken a step
    assert main(["train", cfg, *AE_STAGE, f"--run_dir={half}", "--ckpt_every=1", "--debug_nan_step=4"]) == 2
    assert ckpt.read_checkpoint(half).step == 3
    assert main(["train", cfg, *AE_STAGE, f"--run_dir={half}", "--resume"]) == 0
    same_run(half, straight)
    assert checkpoint_bytes(half)["discriminator.safetensors"] == checkpoint_bytes(straight)["discriminator.safetensors"]


# ----------------------------------------------------------------------------------------
# a bad first stage: one line, exit code 2

class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_first_stage(cfg, tmp_path, capsys, latent_run):
    run = ["train", cfg, f"--run_dir={tmp_path / 'run'}"]
    fails_with(capsys, [*run, f"--first_stage={tmp_path / 'nope.pt'}"], "nope.pt does not exist")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(AE.read_bytes()[:5000])
    fails_with(capsys, [*run, f"--first_stage={broken}"], "cannot read first stage", "broken.pt")
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"kind": "kl", "x": _Exploit(str(marker))}, evil)
    fails_with(capsys, [*run, f"--first_stage={evil}"], "refusing to load first stage")
    assert not marker.exists()
    photos = DATA_DIR / "checkpoints" / "ae_photos_f4.pt"
    fails_with(capsys, [*run, f"--first_stage={photos}"], "reads 3-channel images", "has 1")
    fails_with(capsys, [*run, f"--first_stage={latent_run}"], "stage=diffusion run, not an autoencoder")
    fails_with(capsys, [*run, "--unet.in_ch=2", "--unet.out_ch=2"], "latents have 4 channel(s)",
               "--unet.in_ch=4")
    fails_with(capsys, [*run, "--unet.image_size=14"], "--unet.image_size=7")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_another_first_stage_is_refused(latent_run, cfg, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(latent_run, run_dir)
    before = hashlib.sha256(b"".join(checkpoint_bytes(run_dir).values())).hexdigest()
    other = DATA_DIR / "checkpoints" / "ae_digits_f4_kl0.pt"
    fails_with(capsys, ["train", cfg, f"--run_dir={run_dir}", "--steps=6", "--resume", f"--first_stage={other}"],
               "cannot resume", "first_stage")
    assert hashlib.sha256(b"".join(checkpoint_bytes(run_dir).values())).hexdigest() == before


def test_latent_run_on_an_image_folder_encodes_in_the_loop(cfg, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(36, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    run_dir = tmp_path / "run"
    assert main(["train", cfg, f"--run_dir={run_dir}", "--steps=2", "--data.source=folder", f"--data.path={folder}",
                 "--data.image_size=32", "--unet.image_size=8",
                 f"--first_stage={DATA_DIR / 'checkpoints' / 'ae_photos_f4.pt'}"]) == 0
    assert Image.open(run_dir / "samples" / "step_000000002.png").size == (8 * 33 + 1, 33 + 1)
    once = [f"--data.path={folder}", "--data.source=folder", "--data.image_size=32", "--unet.image_size=8",
            f"--first_stage={DATA_DIR / 'checkpoints' / 'ae_photos_f4.pt'}", "--data.encode_once", "--steps=2"]
    assert main(["train", cfg, f"--run_dir={tmp_path / 'once'}", *once]) == 0
    assert main(["train", cfg, f"--run_dir={tmp_path / 'again'}", *once]) == 0
    same_run(tmp_path / "once", tmp_path / "again")  # the encoded folder is seeded: the same latents
    cache = tmp_path / "once" / "latents.pt"
    written = cache.stat().st_mtime_ns
    assert main(["train", cfg, f"--run_dir={tmp_path / 'once'}", *once[:-1], "--steps=4", "--resume"]) == 0
    assert cache.stat().st_mtime_ns == written  # the resumed run read the encoded folder
    assert main(["train", cfg, f"--run_dir={tmp_path / 'straight'}", *once[:-1], "--steps=4"]) == 0
    same_run(tmp_path / "once", tmp_path / "straight")  # and ends where an unbroken run ends
    (folder / "0.png").touch()  # a changed file: the folder is encoded again
    os.utime(folder / "0.png", ns=(written + 10**9, written + 10**9))
    assert main(["train", cfg, f"--run_dir={tmp_path / 'once'}", *once[:-1], "--steps=5", "--resume"]) == 0
    assert cache.stat().st_mtime_ns != written
    a, b = ckpt.read_checkpoint(run_dir), ckpt.read_checkpoint(tmp_path / "once")
    assert any(not torch.equal(a.model[k], b.model[k]) for k in a.model)  # other posterior samples


def test_run_curves_read_both_logs(latent_run):
    from minildm.plotting import run_curves
    curves = run_curves(latent_run)
    lines = [json.loads(line) for line in (latent_run / "log.jsonl").read_text().splitlines()]
    assert curves["loss"] == ([1, 2, 3, 4], [r["loss"] for r in lines])
    assert curves["val/val_loss"][0] == [4] and "time" not in curves


def test_plot_command(latent_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(latent_run), "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 100
    assert main(["plot", str(latent_run), "--keys", "loss,val/val_loss", "--out", str(out)]) == 0
    fails_with(capsys, ["plot", str(latent_run), "--keys", "los"], "los not logged", "loss")
    fails_with(capsys, ["plot", str(tmp_path)], "no log.jsonl")


def _ddp_worker(rank: int, world: int, port: int, cfg: str, run_dir: str, extra: list) -> None:
    import os
    from minildm.config import load_config
    from minildm.runner import run
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    run(load_config(cfg, [f"--run_dir={run_dir}", *extra]))


def test_ddp_gan_first_stage_matches_one_process(cfg, tmp_path):
    """Two gloo processes of 4 images = one of 8, for the autoencoder with its discriminator
    (adaptive weight, D's own optimizer). Kept out, as they are per process by design: D's
    BatchNorm statistics (as in LDM's multi-GPU training), a KL posterior's samples and a VQ
    codebook's EMA updates; hence a VQ model with a gradient-trained codebook and D without
    BatchNorm."""
    import socket
    import torch.multiprocessing as mp
    from minildm.config import load_config
    from minildm.runner import run
    extra = [*AE_STAGE, "--steps=3", "--ckpt_every=3", "--loss.disc_start=1", "--loss.discriminator.norm=none",
             "--quantizer.num_codes=16", "--quantizer.dim=2", "--quantizer.ema=false", "--quantizer.restart_dead=false"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path / "ddp"), extra), nprocs=2)
    run(load_config(cfg, [f"--run_dir={tmp_path / 'one'}", *extra]))
    a, b = ckpt.read_checkpoint(tmp_path / "ddp"), ckpt.read_checkpoint(tmp_path / "one")
    per_process = ("quantizer.last_used", "quantizer.born")  # which codes this process saw, and when

    def close(x, y):
        # Adam turns a gradient of about 0 into a step of +-lr whose sign is rounding noise,
        # so a few weights may differ by up to 3 steps x lr = 3e-3; a missing all-reduce
        # would change nearly all of them
        diff = (x.float() - y.float()).abs()
        return diff.max() <= 3e-3 and (diff > 1e-4).float().mean() < 0.01

    for k in a.model:
        if not k.endswith(per_process):
            assert close(a.model[k], b.model[k]), k
    da = ckpt.load_tensors("d", a.extra["discriminator.safetensors"])
    db = ckpt.load_tensors("d", b.extra["discriminator.safetensors"])
    for k in da:
        assert close(da[k], db[k]), k
