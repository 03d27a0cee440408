"""Every shipped config loads, builds its networks and counts their parameters (no training).

The latent recipes point at the run folder of their first-stage recipe, which does not
exist here: their latent shape is taken from that recipe's autoencoder config instead, and
the UNet must accept it. The tiny configs' first stages are shipped files, loaded for real."""

from pathlib import Path

import pytest
import torch

from minildm.config import load_config
from minildm.nn import count_params
from minildm.rundata import channels_of
from minildm.stages import FirstStageExtras, build_model, check_first_stage, load_first_stage
from minildm.text import Tokenizer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def test_the_shipped_configs_are_there():
    names = {p.stem for p in CONFIGS}
    assert {"tiny_digits_ddpm", "tiny_digits_kl", "tiny_digits_vq", "tiny_digits_ldm", "tiny_digits_ldm_class",
            "tiny_shapes_text", "tiny_shapes_kl", "gpu_folder64_kl_f4", "gpu_folder64_ldm_f4", "gpu_folder256_kl_f8",
            "gpu_folder256_ldm_f8"} <= names


def latent_shape(config, path: Path):
    """The (C, h, w) the UNet of a latent config reads."""
    if config.first_stage is None:
        return None
    if config.first_stage.startswith("runs/"):  # a GPU recipe: its first-stage recipe's config
        stage1 = load_config(path.with_name(Path(config.first_stage).name.replace("folder", "gpu_folder") + ".py"))
        assert stage1.stage == "autoencoder" and stage1.data.image_size == config.data.image_size
        return stage1.autoencoder.latent_shape(config.data.image_size)
    return check_first_stage(load_first_stage(config.first_stage), config)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_networks(path):
    """Build on the meta device (shapes, no memory) and count the parameters; the tiny
    configs also run one forward pass on the CPU, which must give back the input's shape."""
    config = load_config(path)
    shape = latent_shape(config, path)
    with torch.device("meta"):
        n = count_params(build_model(config, shape))
    assert n > 0
    if config.stage == "diffusion":
        c, s = shape[:2] if shape is not None else (channels_of(config), config.data.image_size)
        assert (config.unet.in_ch, config.unet.out_ch, config.unet.image_size) == (c, c, s)
    elif config.loss.disc_weight > 0:  # the discriminator reads the images the autoencoder writes
        assert config.loss.discriminator.in_ch == config.autoencoder.in_ch
    print(f"{path.stem}: {n:,} parameters")
    if not path.stem.startswith("tiny_"):
        return
    torch.manual_seed(0)
    net = build_model(config, shape).eval()
    if config.stage == "diffusion":
        x = torch.randn(2, c, s, s)
        cond = None
        if config.unet.num_classes is not None:
            cond = torch.tensor([3, config.unet.num_classes])  # a class and the null class
        if config.text is not None:
            cond = Tokenizer(max_len=config.text.max_len)(["a big red star in the middle", ""])[0]
        with torch.no_grad():
            out = net(x, torch.tensor([10.0, 20.0])) if cond is None else net(x, torch.tensor([10.0, 20.0]), cond)
    else:
        x = torch.randn(2, config.autoencoder.in_ch, config.data.image_size, config.data.image_size)
        with torch.no_grad():
            out = net(x)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_tiny_autoencoder_extras_build():
    shapes = FirstStageExtras.build(load_config(CONFIGS[0].with_name("tiny_shapes_kl.py")), torch.device("cpu"))
    assert shapes.perceptual is not None and shapes.discriminator is not None and shapes.logvar is not None
    digits = FirstStageExtras.build(load_config(CONFIGS[0].with_name("tiny_digits_kl.py")), torch.device("cpu"))
    assert digits.discriminator is None and digits.perceptual is None and digits.logvar is not None
