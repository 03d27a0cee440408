"""FID, KID, PSNR and SSIM against torchmetrics' implementations and closed forms."""

import math

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim
from torchmetrics.image.fid import _compute_fid as tm_frechet
from torchmetrics.image.kid import poly_mmd as tm_poly_mmd

from minildm.data import load_digits
from minildm.metrics import (
    feature_stats,
    fid,
    fid_from_features,
    frechet_distance,
    kid,
    kid_from_features,
    mmd2_unbiased,
    psnr,
    real_vs_real_fid,
    ssim,
)


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Correlated, non-Gaussian features (n, d): a random linear map of skewed noise, plus shift."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(123)) / math.sqrt(d)
    z = torch.randn(n, d, generator=g).exp()  # lognormal, skewed
    return (z @ A + shift).double()


# -----------------------------------------------------------------------------
# FID

@pytest.mark.parametrize("d", [8, 64])
def test_frechet_distance_matches_torchmetrics(d):
    s1, s2 = feature_stats(_features(500, d, 0)), feature_stats(_features(400, d, 1, shift=0.3))
    mine = frechet_distance(*s1, *s2)
    ref = tm_frechet(s1[0], s1[1], s2[0], s2[1]).item()
    assert mine == pytest.approx(ref, rel=1e-7, abs=1e-9)
    assert frechet_distance(*s2, *s1) == pytest.approx(mine, rel=1e-9)  # symmetric


def test_frechet_distance_diagonal_closed_form():
    """For diagonal covariances: ||mu1 - mu2||^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i))."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    s1 = torch.rand(16, generator=g, dtype=torch.float64) * 3
    s2 = torch.rand(16, generator=g, dtype=torch.float64) * 3
    s1[0] = 0.0  # a singular covariance is fine too
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected.item(), rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
    f = _features(300, 32, 0)
    assert abs(fid_from_features(f, f)) < 1e-8
    assert fid_from_features(f, _features(300, 32, 1, shift=0.5)) > 32 * 0.2  # a shift of 0.5 per dim


def test_fid_needs_more_samples_than_dimensions():
    with pytest.raises(ValueError, match="singular.*kid_from_features"):
        fid_from_features(_features(64, 64, 0), _features(500, 64, 1))


def test_fid_of_digits():
    """Through the digit classifier: 0 for a set with itself, far above the real-vs-real
    baseline for noisy digits."""
    x, _ = load_digits("test")  # (500, 1, 28, 28)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert abs(fid(x, x)) < 1e-6
    baseline = real_vs_real_fid(250, seed=0)
    assert 0 < baseline < 10  # small-sample bias, measured ~3 with the shipped weights
    assert fid(x[:250], noisy[250:]) > 10 * baseline


def test_real_vs_real_checks_n():
    with pytest.raises(ValueError, match="2250"):
        real_vs_real_fid(3000)


# -----------------------------------------------------------------------------
# KID

def test_mmd2_unbiased_matches_torchmetrics():
    x, y = _features(200, 16, 0), _features(200, 16, 1, shift=0.1)
    assert mmd2_unbiased(x, y) == pytest.approx(tm_poly_mmd(x, y).item(), rel=1e-9)


def test_kid_subsets_match_torchmetrics():
    """Same subsets (drawn as kid_from_features documents) -> same mean and std as torchmetrics."""
    f_real, f_fake = _features(300, 16, 0), _features(250, 16, 1, shift=0.1)
    mean, std = kid_from_features(f_real, f_fake, subsets=10, subset_size=100, seed=3)
    g = torch.Generator().manual_seed(3)
    ref = torch.stack([tm_poly_mmd(f_real[torch.randperm(300, generator=g)[:100]],
                                   f_fake[torch.randperm(250, generator=g)[:100]]) for _ in range(10)])
    assert mean == pytest.approx(ref.mean().item(), rel=1e-9)
    assert std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-9)
    # subsets no smaller than the sets: every subset is the whole set, the unbiased MMD of all samples
    mean_all, std_all = kid_from_features(f_real[:200], f_fake[:200], subsets=2, subset_size=1000)
    assert mean_all == pytest.approx(tm_poly_mmd(f_real[:200], f_fake[:200]).item(), rel=1e-9)
    assert std_all < 1e-9


def test_kid_is_unbiased_and_detects_a_shift():
    same = [kid_from_features(_features(200, 8, 2 * s), _features(200, 8, 2 * s + 1), subsets=1)[0]
            for s in range(10)]
    shifted = kid_from_features(_features(200, 8, 0), _features(200, 8, 1, shift=0.5), subsets=1)[0]
    assert abs(sum(same) / len(same)) < 0.5 * shifted
    assert min(same) < 0 < max(same)  # an unbiased estimate of 0 comes out on both sides


def test_kid_of_digits():
    x, _ = load_digits("test")
    mean, std = kid(x[:250], x[250:], subsets=5, subset_size=100)
    assert math.isfinite(mean) and std > 0


# -----------------------------------------------------------------------------
# PSNR and SSIM

def test_psnr_closed_form():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    c = torch.tensor([0.1, 0.2, 0.5])
    y = x + c[:, None, None, None]  # MSE = c^2
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(4.0 / c**2))
    torch.testing.assert_close(psnr((x + 1) / 2, (y + 1) / 2, data_range=1.0), psnr(x, y))  # scale-free
    assert torch.isinf(psnr(x, x)).all()


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (2, 1, 28, 28)])
def test_ssim_matches_torchmetrics(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
    # our images live in [-1, 1]; SSIM is defined on non-negative intensities: compare on [0, 1]
    ref = tm_ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0, reduction="none")
    torch.testing.assert_close(ssim(x, y), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ssim(x + 1, y + 1, data_range=2.0, low=0.0), ref, atol=1e-5, rtol=1e-5)


def test_ssim_of_an_image_with_itself_is_one():
    x, _ = load_digits("test")
    torch.testing.assert_close(ssim(x[:8], x[:8]), torch.ones(8))
    noisy = (x[:8] + 0.3 * torch.randn(x[:8].shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert (ssim(x[:8], noisy) < 0.9).all()


def test_psnr_ssim_check_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="6 x 6"):
        ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
