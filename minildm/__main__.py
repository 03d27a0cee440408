"""The command line: ``python -m minildm {train,sample,evaluate,plot} ...`` (each has --help).

    python -m minildm train configs/tiny_digits_ddpm.py [--key=value ...] [--resume]
    torchrun --nproc_per_node=8 -m minildm train configs/my_run.py --resume
    python -m minildm sample runs/tiny_digits_ddpm --n 64 --out grid.png [--sampler ddim --steps 50]
    python -m minildm sample runs/tiny_shapes_text --prompt "a big red star in the middle" --guidance 3
    python -m minildm evaluate runs/tiny_digits_ddpm
    python -m minildm plot runs/tiny_digits_ddpm --out curves.png

A user mistake (a config typo, a missing image folder, a corrupt image or checkpoint, an
incompatible resume, a non-finite loss) prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

import torch

from minildm.checkpoint import CheckpointError
from minildm.config import ConfigError, TrainConfig, config_keys, from_dict, load_config
from minildm.data import DataError

USER_ERRORS = (ConfigError, CheckpointError, DataError)  # + runner.RunError, imported lazily


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minildm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a stage from a config file", allow_abbrev=False,
                       description="Train from CONFIG.py (which defines `config = TrainConfig(...)`); "
                                   "override any field with --key=value, e.g. --optim.lr=1e-4 --unet.ch_mult=1,2,2.")
    t.add_argument("config", help="a Python config file, e.g. configs/tiny_digits_ddpm.py")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in run_dir (a fresh start if none)")
    s = sub.add_parser("sample", help="draw samples from a diffusion checkpoint into a PNG grid")
    s.add_argument("checkpoint", help="a checkpoint folder (step_*) or a run folder (its newest checkpoint)")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")
    s.add_argument("--sampler", choices=("ddim", "ddpm", "heun", "heun_edm"), default="ddim",
                   help="default ddim; heun_edm: Heun at EDM's noise levels (rho = 7)")
    s.add_argument("--steps", type=int, default=50, help="sampler steps for ddim / heun / heun_edm (default 50)")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the config's guidance; 1 = none)")
    s.add_argument("--label", type=int, default=None, help="class-conditional: draw this class (default 0..K-1 in turn)")
    s.add_argument("--prompt", default=None, help='text-conditional: a caption, e.g. "a big red star in the middle"')
    e = sub.add_parser("evaluate", help="FID/KID of a diffusion model (digit classifier's features for digits, "
                                        "the photo-trained perceptual net's for shapes or a folder), prompt "
                                        "accuracy of a text-to-image shapes model, or PSNR/SSIM of an autoencoder")
    e.add_argument("checkpoint", help="a checkpoint folder (step_*) or a run folder (its newest checkpoint)")
    e.add_argument("--n", type=int, default=500, help="samples for FID/KID (default 500, the digit test set; "
                   "a folder: as many of its images)")
    e.add_argument("--steps", type=int, default=50, help="DDIM steps for the samples (default 50)")
    e.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    e.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    e.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the config's)")
    pl = sub.add_parser("plot", help="plot a run's curves (log.jsonl, metrics.jsonl) into a PNG")
    pl.add_argument("run_dir", help="a run folder (the run_dir of its config)")
    pl.add_argument("--out", default=None, help="PNG file to write (default RUN_DIR/curves.png)")
    pl.add_argument("--keys", default=None, help="comma-separated curves, e.g. loss,lr,val/val_loss (default all)")
    return p


def _plot(run_dir: str, out: str | None, keys: str | None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    from minildm.plotting import plot_run
    try:
        fig = plot_run(run_dir, keys.split(",") if keys else None)
    except (FileNotFoundError, KeyError) as e:
        raise ConfigError(str(e).strip("'\"")) from None
    path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=80)
    return path


def _load_model(path: str, use_ema: bool = True) -> tuple[torch.nn.Module, TrainConfig, object]:
    """The network of a checkpoint (EMA weights if it has them and use_ema), in eval mode, its
    config, and the frozen first stage stored with a latent run (else None)."""
    from minildm import checkpoint as ckpt
    from minildm.stages import build_model, first_stage_from_bytes
    c = ckpt.read_checkpoint(path)
    try:
        config = from_dict(c.config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{c.path / 'config.json'} is not a config this minildm can read: {err}") from None
    first_stage = None
    if "first_stage.pt" in c.extra:
        first_stage = first_stage_from_bytes(c.extra["first_stage.pt"], c.path / "first_stage.pt")
    shape = first_stage.config.latent_shape(config.data.image_size) if first_stage is not None else None
    net = build_model(config, shape)
    ckpt.load_weights(net, c.model, c.path)
    if use_ema and c.ema is not None:
        for name, p in net.named_parameters():
            p.data.copy_(c.ema[f"params.{name}"])
    return net.eval(), config, first_stage


def _conditions(config: TrainConfig, n: int, label: int | None, prompt: str | None) -> torch.Tensor | None:
    """n conditions for a conditional model: one class (--label) or 0, 1, ..., K-1 in turn;
    one caption (--prompt) or the held-out captions in turn. None for an unconditional model."""
    if config.stage != "diffusion":
        return None
    if config.unet.num_classes is not None:
        K = config.unet.num_classes
        if prompt is not None:
            raise ConfigError("this model is class-conditional: use --label, not --prompt")
        if label is not None and not 0 <= label < K:
            raise ConfigError(f"--label={label}: this model knows the classes 0..{K - 1}")
        return torch.full((n,), label) if label is not None else torch.arange(n) % K
    if config.text is not None:
        from minildm.monitor import sample_conditions
        from minildm.rundata import validation_batch
        if label is not None:
            raise ConfigError("this model reads captions: use --prompt, not --label")
        if prompt is not None:
            return config.text.tokenizer()([prompt] * n)[0]
        return sample_conditions(config, validation_batch(config, 1000)[1], n)
    if label is not None or prompt is not None:
        raise ConfigError("this model is unconditional: drop --label / --prompt")
    return None


def _sample(net: torch.nn.Module, config: TrainConfig, first_stage, n: int, sampler: str, steps: int, seed: int,
            guidance: float | None = None, label: int | None = None, prompt: str | None = None) -> torch.Tensor:
    from minildm.stages import sample_images
    if config.stage != "diffusion":
        raise ConfigError(f"this checkpoint is a first-stage autoencoder (stage={config.stage}); "
                          "it has no sampler: use `python -m minildm evaluate`")
    cond = _conditions(config, n, label, prompt)
    scale = config.guidance if guidance is None else guidance
    return sample_images(net, config, n, cond, scale, sampler, steps, first_stage, torch.Generator().manual_seed(seed))


def _evaluate(net: torch.nn.Module, config: TrainConfig, first_stage, n: int, steps: int, seed: int,
              guidance: float | None = None) -> dict:
    """FID and KID of n samples (class-conditional models draw the classes in turn) against
    held-out images, or PSNR and SSIM of the reconstructions of the held-out images
    (autoencoder). The features: the digit classifier's for digits (against the 500 test
    digits); for the shapes or an image folder, the pooled features of the project's
    perceptual net trained on photo crops (`minildm.perceptual.photo_features`, 64-d), against
    n images of the data. Neither is Inception's: compare runs with each other, not with papers."""
    from minildm.features import digit_features
    from minildm.metrics import fid, kid, psnr, ssim
    from minildm.perceptual import photo_features
    from minildm.rundata import validation_images
    if config.stage == "diffusion" and config.text is not None and config.data.source == "shapes":
        return _prompt_accuracy(net, config, first_stage, n, steps, seed, guidance)
    if config.stage == "diffusion":
        if n <= 64:
            raise ConfigError(f"--n {n}: FID needs more samples than its 64 feature dimensions; use --n 65 or more")
        digits = config.data.source == "digits"
        real = validation_images(config, 500 if digits else n)
        if len(real) <= 64:
            raise ConfigError(f"{config.data.path} holds {len(real)} images; FID needs 65 or more")
        with torch.no_grad():
            fake = torch.cat([_sample(net, config, first_stage, min(250, n - i), "ddim", steps, seed + i, guidance)
                              for i in range(0, n, 250)]).clamp(-1, 1)
        if digits and real.shape[-1] != 28:  # the classifier reads 28 x 28 digits; undo the 32 px padding
            real, fake = real[..., 2:-2, 2:-2], fake[..., 2:-2, 2:-2]
        features = digit_features if digits else photo_features
        kid_mean, kid_std = kid(real, fake, features,  # subsets must vary
                                subset_size=min(len(real), len(fake)) // 2)
        out = {"fid": fid(real, fake, features), "kid": kid_mean, "kid_std": kid_std, "n": n, "ddim_steps": steps,
               "features": "digit classifier" if digits else "perceptual net (photo crops)"}
        if config.unet.num_classes is not None or config.text is not None:
            out["guidance"] = config.guidance if guidance is None else guidance
        return out
    x = validation_images(config, 10_000)
    with torch.no_grad():
        from minildm.autoencoder import AutoencoderKL
        x_rec = torch.cat([(net(b, sample=False) if isinstance(net, AutoencoderKL) else net(b))[0]
                           for b in x.split(250)]).clamp(-1, 1)
    return {"psnr": psnr(x_rec, x).mean().item(), "ssim": ssim(x_rec, x).mean().item(), "n": len(x)}


def _prompt_accuracy(net: torch.nn.Module, config: TrainConfig, first_stage, n: int, steps: int, seed: int,
                     guidance: float | None) -> dict:
    """Text-to-image on the shapes: one sample per held-out caption (the first n of 1,000), and
    the fraction whose shape, colour, size and position the shipped shapes classifier reads
    as the caption says (lesson 07's prompt accuracy)."""
    from minildm.data import ShapeLabels
    from minildm.features import SHAPE_ATTRIBUTES, load_shapes_classifier, predict_attributes, prompt_accuracy
    from minildm.rundata import held_out_shapes
    from minildm.stages import sample_images
    if config.data.image_size != 32:
        raise ConfigError("prompt accuracy uses the shapes classifier, which reads 32 px images")
    shapes = held_out_shapes(config)
    n = min(n, len(shapes))
    ids = config.text.tokenizer()(shapes.captions[:n])[0]
    scale = config.guidance if guidance is None else guidance
    with torch.no_grad():
        x = torch.cat([sample_images(net, config, len(c), c, scale, "ddim", steps, first_stage,
                                     torch.Generator().manual_seed(seed + i)) for i, c in enumerate(ids.split(250))])
    target = ShapeLabels(**{f: getattr(shapes.labels, f)[:n] for f in (*SHAPE_ATTRIBUTES, "background")})
    accuracy = prompt_accuracy(predict_attributes(load_shapes_classifier(), x), target)
    return {**{f"prompt_accuracy_{k}": v for k, v in accuracy.items()}, "n": n, "ddim_steps": steps, "guidance": scale}


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit code (2 for a user mistake, with one line on stderr)."""
    from minildm.runner import RunError
    args, rest = _parser().parse_known_args(argv)
    try:
        if args.command == "train":
            from minildm.runner import run
            for arg in rest:  # a mistyped --resume would otherwise read as a config key
                key = arg[2:].partition("=")[0]
                if key not in config_keys() and difflib.get_close_matches(key, ["resume"], cutoff=0.7):
                    raise ConfigError(f"unknown option {arg!r}; did you mean --resume?")
            config = load_config(args.config, rest)
            last = run(config, resume=args.resume)
            print(f"done: {last}")
            return 0
        if rest:
            raise ConfigError(f"unrecognised arguments: {' '.join(rest)}")
        if args.command == "plot":
            print(f"wrote {_plot(args.run_dir, args.out, args.keys)}")
            return 0
        net, config, first_stage = _load_model(args.checkpoint, use_ema=not args.no_ema)
        if config.num_threads is not None:  # the run's CPU threads (1 in the tiny configs)
            torch.set_num_threads(config.num_threads)
        if args.command == "sample":
            from minildm.monitor import save_png
            with torch.no_grad():
                x = _sample(net, config, first_stage, args.n, args.sampler, args.steps, args.seed,
                            args.guidance, args.label, args.prompt)
            save_png(x, Path(args.out))
            print(f"wrote {args.out}")
            return 0
        print(json.dumps(_evaluate(net, config, first_stage, args.n, args.steps, args.seed, args.guidance)))
        return 0
    except (*USER_ERRORS, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
