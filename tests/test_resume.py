"""Which config changes a resumed run accepts (minildm.resume.check_compatible)."""

from pathlib import Path

import pytest

from minildm.checkpoint import CheckpointError
from minildm.config import TrainConfig, apply_overrides, to_dict
from minildm.resume import check_compatible

WHERE = Path("runs/x/checkpoints/step_000000100")


def test_same_config_resumes_with_no_differences():
    config = TrainConfig()
    assert check_compatible(to_dict(config), config, WHERE) == []


def test_a_model_defining_key_is_refused_and_named():
    saved = to_dict(TrainConfig())
    with pytest.raises(CheckpointError, match=r"differs in unet.ch: 32 -> 64; use the checkpoint's values"):
        check_compatible(saved, apply_overrides(TrainConfig(), ["--unet.ch=64"]), WHERE)


def test_training_settings_may_change_and_are_reported():
    saved = to_dict(TrainConfig())
    config = apply_overrides(TrainConfig(), ["--steps=5000", "--optim.lr=1e-4"])
    assert check_compatible(saved, config, WHERE) == ["optim.lr", "steps"]


def test_an_autoencoder_run_refuses_switching_the_discriminator_on():
    saved = to_dict(TrainConfig(stage="autoencoder"))
    config = apply_overrides(TrainConfig(stage="autoencoder"), ["--loss.disc_weight=0.5"])
    with pytest.raises(CheckpointError, match="loss.disc_weight"):
        check_compatible(saved, config, WHERE)
