"""Sample quality and reconstruction metrics: FID, KID, PSNR and SSIM.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium"): fit a Gaussian to the features of each image set and take the Frechet
  distance between the two Gaussians.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the
  squared MMD between the two feature sets, with the kernel k(x, y) = (x.y / d + 1)^3.
- PSNR and SSIM (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to
  Structural Similarity") compare a reconstruction with its original, image by image.

The features are those of `minildm.features.digit_features` (a classifier trained on the
digits, D = 64) unless you pass another function. Read the numbers with two facts in mind:

1. FID is biased upwards for small sets (its bias shrinks like 1/n; Binkowski et al. 2018,
   Chong & Forsyth 2020): two disjoint sets of *real* digits do not score 0. Report
   `real_vs_real_fid(n)` next to the FID of n generated digits. KID is unbiased: its
   real-vs-real value scatters around 0.
2. Numbers made with different feature networks, image sizes or set sizes are not comparable;
   in particular these digit-classifier FIDs are not Inception FIDs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minildm.data import load_digits
from minildm.features import digit_features

FeatureFn = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> features (B, D)


# -----------------------------------------------------------------------------
# features of an image set

@torch.no_grad()
def compute_features(x: Tensor, features: FeatureFn = digit_features, batch_size: int = 500) -> Tensor:
    """features(x) for images x (N, C, H, W), batch by batch without gradients: (N, D) on the CPU."""
    return torch.cat([features(xb).cpu() for xb in x.split(batch_size)])


def feature_stats(f: Tensor) -> tuple[Tensor, Tensor]:
    """Mean mu (D,) and covariance Sigma (D, D) of features f (N, D), in float64.

    Sigma = (f - mu)^T (f - mu) / (N - 1), the unbiased estimate (as in every FID code).
    """
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"expected features of shape (N >= 2, D), got {tuple(f.shape)}")
    f = f.double()
    mu = f.mean(0)  # (D,)
    fc = f - mu  # (N, D)
    return mu, fc.T @ fc / (len(f) - 1)  # (D,), (D, D)


# -----------------------------------------------------------------------------
# 1. FID

def _sqrtm_psd(S: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix S (D, D).

    S = V diag(lambda) V^T  =>  S^{1/2} = V diag(sqrt(lambda)) V^T; eigenvalues that rounding
    made slightly negative are set to 0."""
    lam, V = torch.linalg.eigh(S)
    return (V * lam.clamp(min=0).sqrt()) @ V.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet (2-Wasserstein) distance squared between N(mu1, Sigma1) and N(mu2, Sigma2),
    the formula of FID (Heusel et al. 2017; Dowson & Landau 1982):

        d^2 = ||mu1 - mu2||^2 + Tr(Sigma1) + Tr(Sigma2) - 2 Tr((Sigma1 Sigma2)^{1/2})

    Sigma1 Sigma2 is not symmetric, but it is similar to the symmetric positive semi-definite
    M = Sigma1^{1/2} Sigma2 Sigma1^{1/2} (conjugate by Sigma1^{1/2}), so
    Tr((Sigma1 Sigma2)^{1/2}) = sum_i sqrt(lambda_i(M)): two symmetric eigendecompositions in
    float64, no complex numbers and no scipy.sqrtm, and well defined for singular Sigmas.
    mu: (D,), Sigma: (D, D). Returns a Python float.
    """
    mu1, mu2, sigma1, sigma2 = (t.detach().cpu().double() for t in (mu1, mu2, sigma1, sigma2))
    D = mu1.shape[0]
    if mu2.shape != (D,) or sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}")
    root1 = _sqrtm_psd(sigma1)  # Sigma1^{1/2}
    M = root1 @ sigma2 @ root1
    M = (M + M.T) / 2  # symmetric up to rounding; make it exactly so for eigvalsh
    tr_sqrt = torch.linalg.eigvalsh(M).clamp(min=0).sqrt().sum()  # Tr((Sigma1 Sigma2)^{1/2})
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt
    return d2.item()


def fid_from_features(f_real: Tensor, f_fake: Tensor) -> float:
    """FID between two feature sets f_real (N1, D) and f_fake (N2, D): the Frechet distance of
    the Gaussians fitted by `feature_stats`. Needs N1 > D and N2 > D."""
    D = f_real.shape[1]
    for name, f in (("f_real", f_real), ("f_fake", f_fake)):
        if f.ndim != 2 or f.shape[1] != D:
            raise ValueError(f"expected features (N, {D}), got {name} of shape {tuple(f.shape)}")
        if len(f) <= D:
            raise ValueError(
                f"{name} has {len(f)} samples of {D}-d features: FID needs more samples than dimensions. "
                f"The covariance of n samples has rank at most n - 1, so with n <= D it is singular "
                f"and the FID is dominated by estimation error. Use more samples (FID is biased "
                f"upwards for small sets anyway; compare with real_vs_real_fid at the same size), "
                f"or use kid_from_features, which is unbiased and works with a few dozen samples.")
    return frechet_distance(*feature_stats(f_real), *feature_stats(f_fake))


def fid(real_images: Tensor, fake_images: Tensor, features: FeatureFn = digit_features,
        batch_size: int = 500) -> float:
    """FID between two image sets (N1, C, H, W) and (N2, C, H, W), through `features`."""
    return fid_from_features(compute_features(real_images, features, batch_size),
                             compute_features(fake_images, features, batch_size))


# -----------------------------------------------------------------------------
# 2. KID

def polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """k(a_i, b_j) = (a_i . b_j / d + 1)^3 for a (N, d), b (M, d): the (N, M) kernel matrix
    that KID uses (Binkowski et al. 2018)."""
    d = a.shape[1]
    return (a @ b.T / d + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased estimate of MMD^2 between the distributions of x (m, d) and y (n, d) with the
    polynomial kernel (Gretton et al. 2012, "A Kernel Two-Sample Test", Lemma 6):

        MMD_u^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
                  - 2 sum_{i, j} k(x_i, y_j) / (m n)

    Its expectation is the true MMD^2, so it can come out slightly negative. float64."""
    x, y = x.double(), y.double()
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()  # drop the i == j terms
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return (sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2 * k_xy.sum() / (m * n)).item()


def kid_from_features(f_real: Tensor, f_fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and standard deviation of `mmd2_unbiased` over
    `subsets` random subsets of size m = min(subset_size, N1, N2), drawn without replacement
    from f_real (N1, D) and from f_fake (N2, D), as in the authors' code. Seeded by `seed`.

    The std measures the spread over subsets (population std, like torchmetrics), not the
    error of the mean. When neither set is larger than subset_size every subset is a whole
    set, so the std is 0; pass e.g. subset_size=N // 2 to see a spread."""
    if f_real.ndim != 2 or f_fake.ndim != 2 or f_real.shape[1] != f_fake.shape[1]:
        raise ValueError(f"expected features (N1, D) and (N2, D), "
                         f"got {tuple(f_real.shape)} and {tuple(f_fake.shape)}")
    m = min(subset_size, len(f_real), len(f_fake))
    g = torch.Generator().manual_seed(seed)
    f_real, f_fake = f_real.cpu(), f_fake.cpu()
    scores = torch.tensor([
        mmd2_unbiased(f_real[torch.randperm(len(f_real), generator=g)[:m]],
                      f_fake[torch.randperm(len(f_fake), generator=g)[:m]])
        for _ in range(subsets)
    ], dtype=torch.float64)  # (subsets,)
    return scores.mean().item(), scores.std(unbiased=False).item()


def kid(real_images: Tensor, fake_images: Tensor, features: FeatureFn = digit_features,
        subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        batch_size: int = 500) -> tuple[float, float]:
    """KID (mean, std) between two image sets (N1, C, H, W) and (N2, C, H, W), through `features`."""
    return kid_from_features(compute_features(real_images, features, batch_size),
                             compute_features(fake_images, features, batch_size),
                             subsets=subsets, subset_size=subset_size, seed=seed)


# -----------------------------------------------------------------------------
# 3. the real-vs-real baseline

def _two_disjoint_real_sets(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two disjoint random sets of n training digits each, (n, 1, 28, 28) twice."""
    x, _ = load_digits("train")  # (4500, 1, 28, 28)
    if not 2 <= n <= len(x) // 2:
        raise ValueError(f"n={n}: two disjoint sets of the {len(x)} training digits need 2 <= n <= {len(x) // 2}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]], x[perm[n:2 * n]]


def real_vs_real_fid(n: int, seed: int = 0) -> float:
    """FID between two disjoint random sets of n real training digits: what a perfect generator
    of n samples would score against n real ones. Small-sample FID is biased upwards, so
    report this floor next to every FID of n generated digits. n in [D + 1, 2250].

    Measured with the shipped classifier, mean +- std over seeds 0-9: n = 250: 2.0 +- 0.9,
    n = 500: 1.06 +- 0.31, n = 1000: 0.44 +- 0.13, n = 2000: 0.26 +- 0.10 (about 1/n)."""
    return fid(*_two_disjoint_real_sets(n, seed))


def real_vs_real_kid(n: int, seed: int = 0, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    """KID (mean, std) between the same two disjoint sets as `real_vs_real_fid(n, seed)`."""
    return kid(*_two_disjoint_real_sets(n, seed), subsets=subsets, subset_size=subset_size, seed=seed)


# -----------------------------------------------------------------------------
# 4. reconstruction: PSNR and SSIM

def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two image batches (B, C, H, W) of the same shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(data_range^2 / MSE(x, y)), with
    the MSE over channels and pixels. x, y: (B, C, H, W); data_range = 2 for images in [-1, 1]
    (the same images in [0, 1] with data_range = 1 give the same PSNR). Returns (B,);
    +inf where x == y."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(data_range**2 / mse)).to(x.dtype)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """The (size, size) Gaussian weighting window of SSIM (Wang et al. 2004, Sec. III-B), summing to 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-r**2 / (2 * sigma**2))
    w = w / w.sum()
    return torch.outer(w, w)


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, low: float = -1.0) -> Tensor:
    """Mean structural similarity per image (Wang et al. 2004, Eq. 13 and the mean SSIM of Eq. 17).

    Local statistics under an 11 x 11 Gaussian window with sigma 1.5 (Sec. III-B):

        SSIM(x, y) = (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2))

    with C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03 and L = data_range, averaged over
    channels and pixels. Pixel values lie in [low, low + data_range] and are first shifted to
    [0, data_range]: SSIM's luminance term assumes non-negative intensities (with [-1, 1]
    values a mid-grey mean near 0 would make it blow up), so for images in [-1, 1] this equals
    SSIM on (x + 1) / 2 in [0, 1] with data_range = 1, the usual convention. The borders are
    reflect-padded so every pixel counts, like torchmetrics' `structural_similarity_index_measure`
    (the authors' MATLAB code instead keeps only windows that fit, the 'valid' region).
    x, y: (B, C, H, W) with H, W >= 6. Returns (B,); SSIM(x, x) = 1.
    """
    _check_pair(x, y)
    B, C, H, W = x.shape
    size, pad = 11, 5
    if H <= pad or W <= pad:
        raise ValueError(f"SSIM with an 11 x 11 window needs images of at least 6 x 6 px, got {H} x {W}")
    K1, K2 = 0.01, 0.03
    C1, C2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    x, y = x - low, y - low  # intensities in [0, data_range]
    window = gaussian_window(size, 1.5).to(x)[None, None].expand(C, 1, size, size)  # (C, 1, 11, 11)
    stacked = torch.cat([x, y, x * x, y * y, x * y])  # (5B, C, H, W)
    stacked = F.pad(stacked, (pad, pad, pad, pad), mode="reflect")  # (5B, C, H + 10, W + 10)
    mu_x, mu_y, e_xx, e_yy, e_xy = F.conv2d(stacked, window, groups=C).split(B)  # each (B, C, H, W)
    var_x = (e_xx - mu_x**2).clamp(min=0)  # sigma_x^2
    var_y = (e_yy - mu_y**2).clamp(min=0)  # sigma_y^2
    cov_xy = e_xy - mu_x * mu_y  # sigma_xy
    ssim_map = ((2 * mu_x * mu_y + C1) * (2 * cov_xy + C2)
                / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2)))  # (B, C, H, W)
    return ssim_map.flatten(1).mean(1)  # (B,)
