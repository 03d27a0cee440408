"""The LPIPS-style perceptual distance, the VGG16 loader and the default feature net's
training routine, each against a hand computation or a property that must hold."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minildm.data import PHOTO_NAMES, photo_crops
from minildm.perceptual import (LPIPS_TAPS, ZOOMS, PerceptualDistance, PerceptualNet, PerceptualTrainConfig,
                                VGG16Features, load_perceptual_net, load_vgg16, normalize_channels, photo_features,
                                train_perceptual_net, zoom_dataset)


def crops(n=4, size=32, seed=0):
    """Smooth random colour images with some texture, (n, 3, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    return torch.tanh(low + 0.3 * torch.randn(n, 3, size, size, generator=g))


def blur(x, k):
    """Box blur of odd size k, reflect-padded."""
    w = torch.ones(3, 1, k, k) / k**2
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect"), w, groups=3)


@pytest.fixture(scope="module")
def distance():
    torch.manual_seed(0)
    return PerceptualDistance(PerceptualNet())  # random weights: the properties below hold for any net


# -----------------------------------------------------------------------------
# perceptual distance

def test_zero_for_identical_images_and_symmetric(distance):
    x, y = crops(seed=0), crops(seed=1)
    assert distance(x, x).abs().max() < 1e-6
    torch.testing.assert_close(distance(x, y), distance(y, x))
    assert (distance(x, y) > 0).all()


def test_grows_with_the_strength_of_one_distortion(distance):
    x = crops(8)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    by_noise = torch.stack([distance(x, x + s * noise).mean() for s in (0.05, 0.1, 0.2, 0.4)])
    by_blur = torch.stack([distance(x, blur(x, k)).mean() for k in (3, 5, 7)])
    assert (by_noise.diff() > 0).all() and (by_blur.diff() > 0).all()


def test_matches_eq1_by_hand():
    """One layer, a 1x1 conv net: the distance is the spatial mean of sum_c w_c (f/|f| - g/|g|)^2."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1)

    class OneLayer(nn.Module):
        def forward(self, x):
            return [conv(x)]

    w = torch.rand(5)
    x, y = crops(2), crops(2, seed=1)
    fx, fy = conv(x), conv(y)
    fx, fy = fx / fx.norm(dim=1, keepdim=True), fy / fy.norm(dim=1, keepdim=True)
    hand = ((fx - fy) ** 2 * w[:, None, None]).sum(1).mean((1, 2))
    torch.testing.assert_close(PerceptualDistance(OneLayer(), [w])(x, y), hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normalize_channels(conv(x)).norm(dim=1), torch.ones(2, 32, 32))


def test_gradients_reach_the_images_not_the_net(distance):
    x, y = crops(2), crops(2, seed=1).requires_grad_()
    distance(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in distance.net.parameters())


def test_channel_weights_must_fit_the_layers():
    with pytest.raises(ValueError, match="channel_weights\\[0\\] has 3 entries"):
        PerceptualDistance(PerceptualNet(), [torch.ones(3)] * 4)(crops(1), crops(1))


# -----------------------------------------------------------------------------
# VGG16 in torchvision's format

def torchvision_vgg16_state_dict() -> dict:
    """A randomly initialised VGG16 state dict with torchvision's keys and shapes (written out
    from torchvision's vgg16: features.{0,2,5,...,28} convs and classifier.{0,3,6} linears)."""
    g = torch.Generator().manual_seed(0)
    convs = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
             14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
             26: (512, 512), 28: (512, 512)}
    state = {}
    for i, (cin, cout) in convs.items():
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        state[f"features.{i}.bias"] = torch.zeros(cout)
    for i, (cin, cout) in {0: (25088, 8), 3: (8, 8), 6: (8, 1000)}.items():  # shrunk classifier, ignored
        state[f"classifier.{i}.weight"] = torch.randn(cout, cin, generator=g) * 0.01
        state[f"classifier.{i}.bias"] = torch.zeros(cout)
    return state


def test_vgg16_loader_maps_a_torchvision_state_dict(tmp_path):
    state = torchvision_vgg16_state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    net = load_vgg16(path)
    for k, v in net.state_dict().items():
        if k.startswith("features."):
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    x = crops(2)
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8),
                                              (2, 512, 4, 4), (2, 512, 2, 2)]
    # relu1_2 by hand: LPIPS scaling, conv 0, ReLU, conv 2, ReLU
    h = (x - net.shift) / net.scale
    h = F.relu(F.conv2d(F.relu(F.conv2d(h, state["features.0.weight"], state["features.0.bias"], padding=1)),
                        state["features.2.weight"], state["features.2.bias"], padding=1))
    torch.testing.assert_close(feats[0], h)
    assert [type(net.features[i]) for i in LPIPS_TAPS] == [nn.ReLU] * 5
    d = PerceptualDistance(net)(x, blur(x, 5))
    assert d.shape == (2,) and (d > 0).all()


def test_vgg16_loader_rejects_other_files(tmp_path):
    path = tmp_path / "not_vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        load_vgg16(path)
    with pytest.raises(FileNotFoundError, match="torchvision VGG16 state dict"):
        load_vgg16(tmp_path / "missing.pth")


def test_vgg16_layers_match_torchvision_indices():
    convs = [i for i, m in enumerate(VGG16Features().features) if isinstance(m, nn.Conv2d)]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


# -----------------------------------------------------------------------------
# the default feature net: its training routine and its files


def test_zoom_dataset_labels_name_the_photo_and_the_zoom():
    x, y = zoom_dataset(2, seed=3)
    assert x.shape == (90, 3, 32, 32) and torch.equal(y, torch.arange(45).repeat_interleave(2))
    k = 2 * len(ZOOMS) + 4  # the third photo at the strongest zoom
    torch.testing.assert_close(x[2 * k:2 * k + 2], photo_crops(2, 32, seed=3000 + k, downscales=(ZOOMS[4],),
                                                               names=(PHOTO_NAMES[2],)))


def test_perceptual_net_training_is_deterministic():
    cfg = PerceptualTrainConfig(steps=3, batch_size=8, n_per_class=1)
    a, b = train_perceptual_net(seed=0, config=cfg), train_perceptual_net(seed=0, config=cfg)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert not a.training


def test_shipped_net_gives_fid_features_and_a_clear_error_for_a_missing_file(tmp_path):
    f = photo_features(crops(3))
    assert f.shape == (3, 64) and torch.isfinite(f).all()
    with pytest.raises(FileNotFoundError, match="build_perceptual_net.py"):
        load_perceptual_net(path=tmp_path / "nope.pt")
