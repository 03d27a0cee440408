"""The digit classifier whose features FID and KID use: shipped weights, shapes, determinism."""

import torch
import pytest

import minildm.features as features
from minildm.data import DATA_DIR, load_digits
from minildm.features import (
    ClassifierConfig,
    DigitClassifier,
    TrainConfig,
    accuracy,
    digit_features,
    load_digit_classifier,
    random_affine,
    train_digit_classifier,
)


def test_shipped_weights_reach_98_percent_on_the_test_split():
    path = DATA_DIR / "digit_classifier.pt"
    assert path.is_file() and path.stat().st_size < 500_000
    net = load_digit_classifier()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for size in (28, 32):
        x, y = load_digits("test", size=size)  # (500, 1, size, size)
        assert accuracy(net, x, y) >= 0.98


def test_features_shape_and_size_invariance():
    x28, _ = load_digits("test", size=28)
    x32, _ = load_digits("test", size=32)
    with torch.no_grad():
        f28, f32 = digit_features(x28[:20]), digit_features(x32[:20])
    assert f28.shape == (20, ClassifierConfig().feature_dim)
    torch.testing.assert_close(f28, f32)  # 28 px digits are padded exactly like load_digits(size=32)


def test_features_are_deterministic_and_batch_independent():
    x, _ = load_digits("test")
    with torch.no_grad():
        a, b = digit_features(x[:50]), digit_features(x[:50])
        c = digit_features(x[:10])
    assert torch.equal(a, b)
    torch.testing.assert_close(a[:10], c)  # eval-mode BatchNorm: a digit's features ignore its batch


def test_features_check_shape():
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        digit_features(torch.zeros(2, 3, 28, 28))


def test_training_is_deterministic():
    """A few steps of the training recipe twice with the same seed: identical weights."""
    config = TrainConfig(steps=3, batch_size=16)
    a = train_digit_classifier(seed=5, config=config).state_dict()
    b = train_digit_classifier(seed=5, config=config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_digit_classifier(seed=6, config=config).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_random_affine_keeps_the_background():
    x, _ = load_digits("test", size=32)
    g = torch.Generator().manual_seed(0)
    identity = TrainConfig(max_shift=0.0, max_rotation=0.0, max_scale=0.0)
    torch.testing.assert_close(random_affine(x[:4], identity, g), x[:4], atol=1e-5, rtol=0)
    jittered = random_affine(x[:4], TrainConfig(), g)
    assert jittered.shape == x[:4].shape
    top_row = jittered[..., 0, :]
    torch.testing.assert_close(top_row, torch.full_like(top_row, -1.0))  # the border stays background


def test_missing_weights_are_trained_once_and_cached(tmp_path, monkeypatch):
    """Without data/digit_classifier.pt, load_digit_classifier trains, caches under $MINILDM_CACHE, then reads."""
    calls = []

    def fake_training() -> DigitClassifier:  # stands in for the 1-minute run
        calls.append(1)
        torch.manual_seed(0)
        return DigitClassifier().eval()

    monkeypatch.setattr(features, "DATA_DIR", tmp_path / "no_data")
    monkeypatch.setattr(features, "train_digit_classifier", fake_training)
    monkeypatch.setenv("MINILDM_CACHE", str(tmp_path / "cache"))
    a = load_digit_classifier()
    assert (tmp_path / "cache" / "digit_classifier.pt").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["digit_classifier.pt"]  # no temp file left
    b = load_digit_classifier()
    assert calls == [1]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# -----------------------------------------------------------------------------
# the shapes' attribute classifier (lesson 07's prompt accuracy)

from minildm.data import ShapeLabels, make_shapes  # noqa: E402
from minildm.features import (SHAPE_ATTRIBUTES, ShapesClassifier, predict_attributes,  # noqa: E402
                              prompt_accuracy)


def test_shapes_classifier_heads_and_input_check():
    net = ShapesClassifier().eval()
    out = net(make_shapes(4, seed=0).images)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"shape": (4, 5), "color": (4, 6), "size": (4, 3),
                                                           "position": (4, 9)}
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        net(torch.zeros(2, 1, 32, 32))


def test_prompt_accuracy_by_hand():
    target = ShapeLabels(shape=torch.tensor([0, 1, 2, 3]), color=torch.tensor([0, 0, 1, 1]),
                         size=torch.tensor([2, 2, 2, 2]), position=torch.tensor([8, 7, 6, 5]),
                         background=torch.zeros(4, dtype=torch.long))
    pred = {"shape": torch.tensor([0, 1, 2, 0]),  # 3/4
            "color": torch.tensor([0, 0, 0, 1]),  # 3/4, wrong on image 2
            "size": torch.tensor([2, 2, 2, 2]),  # 4/4
            "position": torch.tensor([8, 7, 6, 5])}  # 4/4
    acc = prompt_accuracy(pred, target)
    assert acc == {"shape": 0.75, "color": 0.75, "size": 1.0, "position": 1.0, "all": 0.5}  # images 0, 1


def test_shipped_shapes_classifier_reads_real_shapes():
    from minildm.features import load_shapes_classifier
    assert (DATA_DIR / "shapes_classifier.pt").stat().st_size < 1_000_000
    test = make_shapes(500, seed=1000)
    acc = prompt_accuracy(predict_attributes(load_shapes_classifier(), test.images), test.labels)
    assert all(acc[a] >= 0.97 for a in SHAPE_ATTRIBUTES) and acc["all"] >= 0.95, acc


def test_shapes_classifier_training_is_seeded_and_uses_the_reconstructions():
    from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
    from minildm.features import train_shapes_classifier

    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(in_ch=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_ch=2, groups=4,
                                         attn_mid=False)).eval()
    kw = dict(seed=3, steps=2, batch_size=8, n_train=16)
    a, b = train_shapes_classifier(**kw).state_dict(), train_shapes_classifier(**kw).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_shapes_classifier(first_stage=ae, **kw).state_dict()  # 32 rows: another shuffle, other batches
    assert not all(torch.equal(a[k], c[k]) for k in a)
