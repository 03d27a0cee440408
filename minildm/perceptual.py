"""A perceptual distance in the manner of LPIPS, and the feature networks it can use.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", Eq. 1) compares two images x, y through the activations of L layers of a network:

    d(x, y) = sum_l  1 / (H_l W_l)  sum_{h, w}  || w_l * (f^l_hw(x) - f^l_hw(y)) ||_2^2

where f^l_hw is the C_l-vector at position (h, w) of layer l, first divided by its own L2
norm over the channels ("unit-normalised in the channel dimension"), and w_l (C_l,) are
per-channel weights (ones: the paper's "baseline" variant; LPIPS calibrates them on human
judgements, which we do not have). LDM trains its autoencoders with this distance on VGG16.

No ImageNet weights can be downloaded here, so the feature network is pluggable:

- `PerceptualNet` (the default): a small CNN the project trains itself, reproducibly, on
  photo crops, to tell which photo a 32 px crop comes from *and at which zoom* (9 photos x
  5 downscale factors = 45 classes). Telling the zoom apart needs the texture scale and the
  sharpness of edges, so its features react to blur, noise and lost detail.

      python data/build_perceptual_net.py    # writes data/perceptual_net.pt (a few CPU minutes)

- `VGG16Features` + `load_vgg16`: the standard LPIPS layers (relu1_2, relu2_2, relu3_3,
  relu4_3, relu5_3) of a VGG16 whose torchvision-format state dict you bring as a file
  (``torchvision.models.vgg16(weights=...).state_dict()`` saved with torch.save). Written
  here without torchvision; the keys `features.{i}.weight/bias` match torchvision's.

`photo_features` gives the pooled last-layer features of the default net (D = 64): the
"classifier features" of the reconstruction FID on photo crops (`minildm.metrics.fid_from_features`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minildm.checkpoint import save_atomic
from minildm.data import DATA_DIR, PHOTO_NAMES, batches, photo_crops
from minildm.features import cache_dir, fit_classifier, one_thread

WEIGHTS_FILE = "perceptual_net.pt"  # in data/ (shipped) or in the cache folder (fallback)
ZOOMS = (1.0, 1.5, 2.0, 3.0, 4.0)  # the downscale factors of photo_crops; a class is (photo, zoom)


# -----------------------------------------------------------------------------
# 1. THE PERCEPTUAL DISTANCE

def normalize_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    """f / ||f||_2 over the channel dimension, for features f (B, C, H, W) (LPIPS's normalize_tensor)."""
    return f / (f.square().sum(1, keepdim=True).sqrt() + eps)


class PerceptualDistance(nn.Module):
    """d(x, y) of LPIPS (Zhang et al. 2018, Eq. 1) through a frozen feature network.

    net: a module mapping images (B, 3, H, W) in [-1, 1] to a list of L feature maps
    (B, C_l, H_l, W_l), e.g. `PerceptualNet` or `VGG16Features`.
    channel_weights: L tensors (C_l,) >= 0; None gives ones (LPIPS's uncalibrated baseline).
    forward(x, y) returns (B,) distances; gradients flow to x and y, never to the net.
    """

    def __init__(self, net: nn.Module, channel_weights: Sequence[Tensor] | None = None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.n_layers = len(channel_weights) if channel_weights is not None else None
        if channel_weights is not None:
            for i, w in enumerate(channel_weights):
                if w.ndim != 1 or (w < 0).any():
                    raise ValueError(f"channel_weights[{i}] must be a 1-d tensor of weights >= 0")
                self.register_buffer(f"w{i}", w.detach().float().clone())

    def train(self, mode: bool = True) -> PerceptualDistance:
        super().train(mode)
        self.net.eval()  # the feature network is frozen, whatever the caller's mode
        return self

    def layer_distances(self, x: Tensor, y: Tensor) -> Tensor:
        """The L per-layer terms, (B, L): the spatial mean of sum_c w_c (f_hat(x) - f_hat(y))^2."""
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"expected two image batches (B, C, H, W) of the same shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        B = x.shape[0]
        feats = self.net(torch.cat([x, y]))  # one pass over both: L maps (2B, C_l, H_l, W_l)
        if self.n_layers is not None and len(feats) != self.n_layers:
            raise ValueError(f"the net gives {len(feats)} layers but {self.n_layers} channel weights were given")
        out = []
        for i, f in enumerate(feats):
            f = normalize_channels(f.float())
            diff2 = (f[:B] - f[B:]).square()  # (B, C_l, H_l, W_l)
            if self.n_layers is not None:
                w = getattr(self, f"w{i}")
                if len(w) != f.shape[1]:
                    raise ValueError(f"channel_weights[{i}] has {len(w)} entries, layer {i} has {f.shape[1]} channels")
                diff2 = diff2 * w[:, None, None]
            out.append(diff2.sum(1).mean((1, 2)))  # (B,)
        return torch.stack(out, 1)  # (B, L)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """d(x, y) per image pair, (B,): the sum over layers of `layer_distances`."""
        return self.layer_distances(x, y).sum(1)


# -----------------------------------------------------------------------------
# 2. THE DEFAULT FEATURE NET, TRAINED HERE

@dataclass(frozen=True)
class PerceptualNetConfig:
    widths: tuple[int, ...] = (16, 32, 64, 64)  # one stage each at 32, 16, 8, 4 px (for 32 px crops)
    n_classes: int = len(PHOTO_NAMES) * len(ZOOMS)  # (photo, zoom) pairs


class PerceptualNet(nn.Module):
    """A VGG-like CNN: per stage (after a 2x2 max-pool, except the first) two 3x3 convs with
    ReLUs; forward returns the last ReLU of every stage, like LPIPS's VGG taps. A linear head
    on the spatial mean of the last stage classifies (photo, zoom) during training only."""

    def __init__(self, config: PerceptualNetConfig = PerceptualNetConfig()):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList()
        in_ch = 3
        for i, w in enumerate(config.widths):
            pool = [nn.MaxPool2d(2)] if i > 0 else []
            self.stages.append(nn.Sequential(*pool, nn.Conv2d(in_ch, w, 3, padding=1), nn.ReLU(),
                                             nn.Conv2d(w, w, 3, padding=1), nn.ReLU()))
            in_ch = w
        self.head = nn.Linear(in_ch, config.n_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps of images x (B, 3, H, W) in [-1, 1]: [(B, widths[i], H / 2^i, W / 2^i)]."""
        feats, h = [], x
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def pooled(self, x: Tensor) -> Tensor:
        """The spatial mean of the last stage, (B, widths[-1]): the FID features."""
        return self(x)[-1].mean((2, 3))

    def logits(self, x: Tensor) -> Tensor:
        """(photo, zoom) class logits (B, n_classes); class = photo index * len(ZOOMS) + zoom index."""
        return self.head(self.pooled(x))


def zoom_dataset(n_per_class: int, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Crops (45 n, 3, size, size) of every (photo, zoom) pair and their labels (45 n,),
    label = photo index * len(ZOOMS) + zoom index; `photo_crops` with one photo and one zoom."""
    xs, ys = [], []
    for p, name in enumerate(PHOTO_NAMES):
        for z, zoom in enumerate(ZOOMS):
            k = p * len(ZOOMS) + z
            xs.append(photo_crops(n_per_class, size, seed=seed * 1000 + k, downscales=(zoom,), names=(name,)))
            ys.append(torch.full((n_per_class,), k))
    return torch.cat(xs), torch.cat(ys)


@dataclass(frozen=True)
class PerceptualTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3  # peak of a one-cycle schedule, AdamW
    weight_decay: float = 5e-4
    n_per_class: int = 400  # training crops per (photo, zoom): 18,000 in all, 32 px


@torch.no_grad()
def zoom_accuracy(net: PerceptualNet, x: Tensor, y: Tensor, batch_size: int = 500) -> tuple[float, float]:
    """(accuracy on the 45 (photo, zoom) classes, accuracy on the photo alone) of net on (x, y)."""
    pred = torch.cat([net.logits(xb).argmax(1) for xb in x.split(batch_size)])
    return (pred == y).float().mean().item(), (pred // len(ZOOMS) == y // len(ZOOMS)).float().mean().item()


def train_perceptual_net(seed: int = 0, config: PerceptualTrainConfig = PerceptualTrainConfig(),
                         net_config: PerceptualNetConfig = PerceptualNetConfig(),
                         verbose: bool = False) -> PerceptualNet:
    """Train a PerceptualNet to classify (photo, zoom) of `zoom_dataset(n_per_class, seed=seed)`
    crops (random horizontal flips come from photo_crops), deterministically: cross-entropy,
    AdamW with a one-cycle learning rate, one CPU thread, seeded by `seed`. Returns it in eval mode."""
    with one_thread():
        torch.manual_seed(seed)
        x, y = zoom_dataset(config.n_per_class, seed=seed)
        net = PerceptualNet(net_config)
        return fit_classifier(net, batches(x, y, batch_size=config.batch_size, seed=seed),
                              lambda xb, yb: F.cross_entropy(net.logits(xb), yb),
                              config.steps, config.lr, config.weight_decay, verbose)


def perceptual_weights_path() -> Path:
    """data/perceptual_net.pt if shipped, else the cache file (which may not exist yet)."""
    shipped = DATA_DIR / WEIGHTS_FILE
    return shipped if shipped.is_file() else cache_dir() / WEIGHTS_FILE


def load_perceptual_net(device: str | torch.device = "cpu", path: str | Path | None = None) -> PerceptualNet:
    """The trained default PerceptualNet, frozen, in eval mode. Reads data/perceptual_net.pt
    (made by ``python data/build_perceptual_net.py``); if missing, trains it once with
    `train_perceptual_net()` and caches it in `minildm.features.cache_dir()`. `path`: read
    another file written by the build script instead (e.g. data/perceptual_net_seed1.pt)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; make it with python data/build_perceptual_net.py --out {path}")
    else:
        path = perceptual_weights_path()
    if not path.is_file():
        print(f"{DATA_DIR / WEIGHTS_FILE} not found: training the perceptual net once, caching it at {path}")
        save_atomic({k: v.half() for k, v in train_perceptual_net().state_dict().items()}, path)
    net = PerceptualNet()
    net.load_state_dict({k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()})
    return net.requires_grad_(False).eval().to(device)


def default_perceptual_distance(device: str | torch.device = "cpu") -> PerceptualDistance:
    """PerceptualDistance on the shipped PerceptualNet, channel weights all ones."""
    return PerceptualDistance(load_perceptual_net(device))


@functools.lru_cache(maxsize=None)
def _shared_net(device: torch.device) -> PerceptualNet:
    return load_perceptual_net(device)


def photo_features(x: Tensor) -> Tensor:
    """FID features (B, 64) of photo crops x (B, 3, H, W) in [-1, 1] (clamped, as saving an
    image would): the pooled last stage of the shipped PerceptualNet."""
    return _shared_net(x.device).pooled(x.float().clamp(-1, 1))


# -----------------------------------------------------------------------------
# 3. VGG16 WEIGHTS THAT YOU BRING

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# LPIPS's ScalingLayer: images in [-1, 1] -> ImageNet-normalised inputs (x - shift) / scale
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features` rebuilt layer by layer (same indices, so the same
    state-dict keys `features.{i}.weight`), returning the five LPIPS taps."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> list[Tensor]:
        """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of images x (B, 3, H, W) in [-1, 1]:
        (B, 64, H, W), (B, 128, H/2, W/2), (B, 256, H/4, ...), (B, 512, H/8, ...), (B, 512, H/16, ...)."""
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features[:LPIPS_TAPS[-1] + 1]):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h)
        return out


def load_vgg16(path: str | Path) -> VGG16Features:
    """VGG16Features with the weights of a torchvision-format VGG16 state dict at `path`
    (keys `features.{i}.weight|bias`; the `classifier.*` keys are ignored), frozen, eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: save a torchvision VGG16 state dict there, e.g. "
                                f"torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = VGG16Features()
    wanted = {k for k in net.state_dict() if k.startswith("features.")}
    got = {k: v for k, v in state.items() if k.startswith("features.")}
    if set(got) != wanted:
        missing, extra = sorted(wanted - set(got)), sorted(set(got) - wanted)
        raise ValueError(f"{path} is not a torchvision VGG16 state dict: missing {missing[:4]}, "
                         f"unexpected {extra[:4]} (VGG16 without batch norm is expected, keys features.0.weight ...)")
    net.load_state_dict(got, strict=False)  # shift / scale are ours
    return net.requires_grad_(False).eval()
