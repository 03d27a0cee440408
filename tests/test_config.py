"""Config files and --key=value overrides: typed, checked, one clear message per mistake."""

import pytest

from minildm.config import (ConfigError, TrainConfig, apply_overrides, flatten, from_dict, config_keys,
                            load_config, to_dict)


def test_overrides_parse_every_field_type():
    c = apply_overrides(TrainConfig(), ["--steps=20", "--optim.lr=1e-4", "--bf16=true", "--progress=no",
                                        "--unet.ch_mult=1,2", "--unet.attn_resolutions=16",
                                        "--diffusion.prediction=v", "--optim.grad_clip=None",
                                        "--optim.betas=0.5,0.9", "--compile", "--run_dir=runs/x"])
    assert (c.steps, c.optim.lr, c.bf16, c.progress, c.compile) == (20, 1e-4, True, False, True)
    assert c.unet.ch_mult == (1, 2) and c.unet.attn_resolutions == (16,)
    assert c.diffusion.prediction == "v" and c.optim.grad_clip is None and c.optim.betas == (0.5, 0.9)
    assert c.run_dir == "runs/x"
    assert TrainConfig().steps == 1000  # the original is untouched


def test_a_section_that_is_none_starts_from_its_defaults():
    c = apply_overrides(TrainConfig(stage="autoencoder"), ["--quantizer.num_codes=64"])
    assert c.quantizer.num_codes == 64 and c.quantizer.dim == 4


@pytest.mark.parametrize("arg, words", [
    ("--unet.chmult=1,2", ["unknown config key 'unet.chmult'", "did you mean --unet.ch_mult?"]),
    ("--optim.l=1e-4", ["did you mean --optim.lr?"]),
    ("--stpes=3", ["did you mean --steps?"]),
    ("--optim.lr=fast", ["--optim.lr=fast", "expected float"]),
    ("--steps=2.5", ["expected int"]),
    ("--bf16=maybe", ["expected a bool"]),
    ("--unet.ch_mult=1,x", ["expected tuple[int, ...]"]),
    ("--diffusion.prediction=noise", ["expected one of eps, x0, v"]),
    ("--optim.grad_clip=big", ["expected float | None"]),
    ("--steps", ["needs a value"]),
    ("steps=3", ["overrides look like --key=value"]),
])
def test_mistakes_give_one_clear_message(arg, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), [arg])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_section_checks_rerun_on_override():
    """UNetConfig's own rule (groups divide every width) applies to an overridden value."""
    with pytest.raises(ConfigError, match="--unet.groups: groups=7 must divide"):
        apply_overrides(TrainConfig(), ["--unet.groups=7"])
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        apply_overrides(TrainConfig(), ["--steps=0"])


def test_keys_are_dotted_and_complete():
    k = config_keys()
    assert k["unet.ch"] is int and "optim.lr" in k and "data.path" in k and "quantizer.num_codes" in k
    assert "unet" not in k  # sections themselves are not settable


def test_load_config_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("from minildm.config import TrainConfig\nconfig = TrainConfig(steps=7)\n")
    assert load_config(f, ["--seed=3"]).steps == 7
    assert load_config(f, ["--seed=3"]).seed == 3
    (tmp_path / "bad.py").write_text("config = 3\n")
    with pytest.raises(ConfigError, match="must define `config = TrainConfig"):
        load_config(tmp_path / "bad.py")
    (tmp_path / "boom.py").write_text("raise RuntimeError('oops')\n")
    with pytest.raises(ConfigError, match="failed to run: RuntimeError: oops"):
        load_config(tmp_path / "boom.py")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")


def test_json_round_trip():
    c = apply_overrides(TrainConfig(stage="autoencoder"),
                        ["--quantizer.num_codes=16", "--unet.ch_mult=1,2", "--unet.attn_resolutions=16"])
    assert from_dict(to_dict(c)) == c
    assert flatten(to_dict(c))["unet.ch_mult"] == [1, 2]


def test_shipped_configs_load():
    for name in ("tiny_digits_ddpm", "tiny_digits_kl"):
        c = load_config(f"configs/{name}.py")
        assert c.num_threads == 1 and c.steps > 0
