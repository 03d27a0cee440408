"""Training configs: typed dataclasses in Python files, with checked command-line overrides.

A config file is plain Python that defines ``config = TrainConfig(...)`` (see ``configs/``);
`load_config(path, ["--optim.lr=1e-4", "--unet.ch_mult=1,2,2"])` imports it and applies the
overrides. Every override is checked against the dataclass fields: a typo names the nearest
valid key, a value of the wrong type names the type expected, and the section's own checks
(`__post_init__`, e.g. UNetConfig's width / group rule) run again on the new value. Every
problem is one `ConfigError` with one line of message.

A stage is a config section plus a function in `minildm.stages`: `stage="diffusion"` trains
the UNet of `unet` with the process of `diffusion`, on pixels or, with `first_stage` set, on
the latents of a frozen first stage, unconditional or conditioned on class labels
(`unet.num_classes`) or captions (`text`); `stage="autoencoder"` trains the first stage of
`autoencoder` (KL, or VQ when `quantizer` is set) with the terms of `loss`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minildm.autoencoder import AutoencoderConfig
from minildm.diffusion import Prediction
from minildm.firststage import FirstStageLoss
from minildm.quantize import QuantizerConfig
from minildm.text import TextEncoderConfig
from minildm.unet import UNetConfig
from minildm.weighting import Weighting


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what to do."""


@dataclass
class DataConfig:
    source: Literal["digits", "folder", "shapes"] = "digits"  # shipped MNIST digits (1 channel, labels),
    # your images (3 channels), or make_shapes' procedural shapes (3 channels, captions)
    path: str | None = None  # the image folder when source="folder", searched recursively
    class_subfolders: bool = False  # source="folder": each subfolder of path is a class (sorted names
    # -> labels 0..K-1, as torchvision's ImageFolder); for class-conditional runs, with unet.num_classes=K
    captions: bool = False  # source="folder": each image's caption is in a text file beside it
    # (photo.jpg -> photo.txt); for text-conditional runs, with text=TextEncoderConfig(...)
    shapes_count: int = 10_000  # source="shapes": images generated for training (seed 0; held-out: seed 1)
    image_size: int = 32  # side of the square images; digits: 28 or 32
    batch_size: int = 64  # the global batch of one optimizer step, over all GPUs and accumulation
    num_workers: int = 0  # DataLoader worker processes per GPU; 0 reads in the main process
    encode_once: bool = False  # latent runs on a folder: encode it once at the start (kept in memory and
    # in run_dir/latents.pt for a resume; one posterior sample per image) instead of every batch,
    # which costs the frozen encoder's pass


@dataclass
class OptimConfig:
    lr: float = 2e-4  # peak learning rate, reached after warmup_steps
    betas: tuple[float, ...] = (0.9, 0.999)  # Adam's (beta1, beta2); LDM's first stage uses (0.5, 0.9)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    warmup_steps: int = 0  # linear warm-up from 0 to lr: large batches diverge without it
    cosine: bool = True  # cosine decay from lr to min_lr_ratio * lr at the last step
    min_lr_ratio: float = 0.1  # where the cosine ends, as a fraction of lr
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; None: no clipping
    accumulate: int = 1  # micro-batches per step: batch_size / (accumulate * GPUs) images each


@dataclass
class DiffusionConfig:
    schedule: Literal["linear", "cosine"] = "linear"  # DDPM's linear betas or improved DDPM's cosine
    T: int = 1000  # diffusion steps
    prediction: Prediction = "eps"  # what the UNet predicts: eps, x0 or v
    weighting: Weighting = "simple"  # the loss weighting over t (`minildm.weighting`)
    cond_drop: float = 0.1  # conditional runs: P(condition -> null) per image, for classifier-free guidance

    def __post_init__(self):
        if not 0 <= self.cond_drop <= 1:
            raise ValueError(f"cond_drop must be in [0, 1], got {self.cond_drop}")


@dataclass
class TrainConfig:
    stage: Literal["diffusion", "autoencoder"] = "diffusion"  # which network this run trains
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    run_dir: str = "runs/default"  # where checkpoints, log.jsonl, samples and metrics go
    seed: int = 0  # seeds the data order, the noise and the initial weights
    data: DataConfig = field(default_factory=DataConfig)  # what to train on
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and its learning-rate schedule
    unet: UNetConfig = field(default_factory=UNetConfig)  # stage="diffusion": the denoiser
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # stage="diffusion": the process
    first_stage: str | None = None  # stage="diffusion": latent diffusion in this first stage's latents
    # (an autoencoder run folder, one of its step_* checkpoints, or a save_autoencoder .pt file); None: pixels
    first_stage_scale: float | None = None  # latent runs: the latents' scale factor; None: measure
    # 1 / std(z) on the first 1,000 training images (LDM Sec. 4.3.2)
    text: TextEncoderConfig | None = None  # stage="diffusion": captions (data.source=shapes, or a folder
    # with data.captions) through this encoder, trained with the UNet (needs unet.context_dim = text.dim)
    guidance: float = 1.0  # classifier-free guidance scale of the sample grids (1: none)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # stage="autoencoder"
    quantizer: QuantizerConfig | None = None  # stage="autoencoder": set for a VQ model, None for KL
    loss: FirstStageLoss = field(default_factory=FirstStageLoss)  # stage="autoencoder": term weights
    ema_decay: float | None = 0.999  # EMA of the weights for sampling; None: no EMA
    ema_warmup: bool = True  # EMA decay min(decay, (1+n)/(10+n)): forget the random init fast
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"  # auto: cuda, then mps, then cpu
    bf16: bool = False  # bfloat16 autocast (CUDA; CPUs with AMX); the loss stays float32
    compile: bool = False  # torch.compile the network (minutes of warm-up, faster steps)
    channels_last: bool = False  # NHWC memory layout for the network and its images (faster convs with bf16)
    tf32: bool = True  # TF32 matmuls and convolutions on Ampere+ GPUs
    num_threads: int | None = None  # CPU threads (torch.set_num_threads); None: torch's default
    log_every: int = 10  # steps between lines of log.jsonl
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    sample_every: int = 0  # steps between sample grids and metrics; 0: only at the end
    n_samples: int = 16  # images in a sample grid
    sample_steps: int = 50  # DDIM steps for the sample grids
    progress: bool = True  # show a progress bar (rank 0 only)
    debug_nan_step: int | None = None  # testing: make the loss NaN at this step

    def __post_init__(self):
        for name in ("steps", "log_every", "ckpt_every", "keep_last", "n_samples", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optim.accumulate < 1:
            raise ValueError(f"optim.accumulate must be >= 1, got {self.optim.accumulate}")
        if self.stage == "autoencoder" and self.quantizer is not None and self.quantizer.dim != self.autoencoder.z_ch:
            raise ValueError(f"quantizer.dim={self.quantizer.dim} must equal autoencoder.z_ch={self.autoencoder.z_ch}")


# ----------------------------------------------------------------------------------------
# loading and overriding

def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Import the Python file `path`, take its `config`, and apply `--key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"minildm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{path} failed to run: {type(e).__name__}: {e}") from None
    config = getattr(module, "config", None)
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path} must define `config = TrainConfig(...)`, found {type(config).__name__}")
    return apply_overrides(config, overrides)


def config_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a config dataclass and its type, e.g. {"unet.ch": int, ...}."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        sub = _dataclass_in(tp)
        if sub is not None:
            out.update(config_keys(sub, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in a type `C` or `C | None`, else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse one command-line value as type `tp`: int, float, bool, str, tuples ("1,2,2"),
    Literal choices, and "None" where the type allows it. Raises ConfigError."""
    if _is_union(tp):
        options = typing.get_args(tp)
        if type(None) in options and text.lower() in ("none", "null"):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return parse_value(text, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"--{key}={text}: expected {_type_name(tp)}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if str(c) == text:
                return c
        raise ConfigError(f"--{key}={text}: expected one of {', '.join(map(str, choices))}")
    if origin is tuple:
        items = text.strip("()[] ")
        parts = [p.strip() for p in items.split(",") if p.strip()] if items else []
        args = typing.get_args(tp)
        item_tp = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item_tp is None and len(parts) != len(args):
            raise ConfigError(f"--{key}={text}: expected {len(args)} comma-separated values")
        item_types = [item_tp] * len(parts) if item_tp is not None else list(args)
        try:
            return tuple(parse_value(p, a, key) for p, a in zip(parts, item_types))
        except ConfigError:
            raise ConfigError(f"--{key}={text}: expected {_type_name(tp)}, e.g. 1,2,2") from None
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{key}={text}: expected a bool (true or false)")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            if tp is int:
                try:  # accept 1e4 for an int only when it is a whole number
                    value = float(text)
                    if value.is_integer():
                        return int(value)
                except ValueError:
                    pass
            raise ConfigError(f"--{key}={text}: expected {tp.__name__}") from None
    if tp is str:
        return text
    raise ConfigError(f"--{key}: cannot be set from the command line (type {_type_name(tp)})")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A new config with each "--key=value" (or "--flag" for a bool) applied, checked.
    All overrides of a section are applied together, so --unet.ch_mult=1,2
    --unet.attn_resolutions=16 is checked as a pair."""
    valid = config_keys(type(config))
    tree: dict = {}  # {"unet": {"ch_mult": (1, 2), ...}, "steps": 20}
    for arg in overrides:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --key=value")
        key, eq, text = arg[2:].partition("=")
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean --{close[0]}?" if close else "; see the fields of minildm.config.TrainConfig"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if not eq and valid[key] is not bool:
            raise ConfigError(f"--{key} needs a value: --{key}=...")
        *sections, name = key.split(".")
        node = tree
        for sec in sections:
            node = node.setdefault(sec, {})
        node[name] = parse_value(text, valid[key], key) if eq else True
    return _apply(config, tree, "")


def _apply(obj: Any, tree: dict, prefix: str) -> Any:
    """dataclasses.replace with the values of `tree`, sections first, so that every
    section's __post_init__ checks its final values."""
    changes = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            child = getattr(obj, name)
            if child is None:  # e.g. --quantizer.num_codes=256 on a KL config: start from the defaults
                child = _dataclass_in(typing.get_type_hints(type(obj))[name])()
            value = _apply(child, value, f"{prefix}{name}.")
        changes[name] = value
    try:
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError) as e:
        where = ", ".join(f"--{prefix}{k}" for k in tree)
        raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------
# JSON, for checkpoints

def to_dict(config: TrainConfig) -> dict:
    """The config as plain JSON values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(d: dict, cls: type = TrainConfig) -> Any:
    """Rebuild a config dataclass from `to_dict`'s output (lists back to tuples)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        if name not in hints:
            continue  # a key that an older or newer minildm wrote; the defaults stand
        sub = _dataclass_in(hints[name])
        if sub is not None and isinstance(value, dict):
            value = from_dict(value, sub)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"unet": {"ch": 32}} -> {"unet.ch": 32}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
