"""Classifier-free guidance: the guided combination, condition dropout, and every sampler."""

import pytest
import torch

from minildm import sampling
from minildm.diffusion import broadcast, gaussian_eps
from minildm.guidance import drop_condition, expand_null, guided
from minildm.schedules import cosine_schedule, linear_schedule

MUS = torch.tensor([[2.0, -1.0], [-1.0, 1.5], [0.0, 0.0]])  # class 0, class 1, null class 2
VAR = 0.09


def ideal_conditional(schedule):
    """E[eps | x_t, c] for x0 | c ~ N(MUS[c], VAR I): an exact class-conditional denoiser."""

    def model(xt, t, c):
        ab = broadcast(schedule.alpha_bar_at(t), xt)
        return gaussian_eps(xt, ab, MUS[c], VAR)

    return model


def test_scale_one_is_conditional_and_zero_is_unconditional():
    s = cosine_schedule(100)
    model = ideal_conditional(s)
    xt, t, c = torch.randn(6, 2), torch.tensor([3.0, 10, 20, 50, 80, 99]), torch.tensor([0, 1, 0, 1, 1, 0])
    null = torch.tensor(2)
    torch.testing.assert_close(guided(model, c, null, 1.0)(xt, t), model(xt, t, c))
    torch.testing.assert_close(guided(model, c, null, 0.0)(xt, t), model(xt, t, torch.full((6,), 2)))
    # any other scale: the extrapolation of Ho & Salimans (2022) Eq. 6, by hand
    e_c, e_u = model(xt, t, c), model(xt, t, torch.full((6,), 2))
    torch.testing.assert_close(guided(model, c, null, 3.5)(xt, t), e_u + 3.5 * (e_c - e_u))
    # a scalar t (the samplers pass a batch, but a closure may get one time for all)
    torch.testing.assert_close(guided(model, c, null, 2.0)(xt, torch.tensor(7.0)),
                               guided(model, c, null, 2.0)(xt, torch.full((6,), 7.0)))


def test_guided_uses_one_batch_of_two_b():
    calls = []

    def model(xt, t, c):
        calls.append(xt.shape[0])
        return xt * c[:, None]

    guided(model, torch.tensor([1.0, 2.0]), torch.tensor(0.0), 4.0)(torch.ones(2, 3), torch.zeros(2))
    guided(model, torch.tensor([1.0, 2.0]), torch.tensor(0.0), 1.0)(torch.ones(2, 3), torch.zeros(2))
    assert calls == [4, 2]


SAMPLERS = [
    ("ddpm", lambda m, x, s: sampling.sample_ddpm(m, x, s, generator=torch.Generator().manual_seed(1))),
    ("ddim", lambda m, x, s: sampling.sample_ddim(m, x, s, 1000)),
    ("heun", lambda m, x, s: sampling.sample_heun(m, x, s, 25)),
]


@pytest.mark.parametrize("name,sample", SAMPLERS, ids=[n for n, _ in SAMPLERS])
def test_every_sampler_samples_the_guided_gaussian(name, sample):
    """eps is affine in the mean for Gaussian data, so guiding the exact denoisers of
    N(mu_c, VAR) and N(mu_null, VAR) at scale s is the exact denoiser of
    N(mu_null + s (mu_c - mu_null), VAR): every sampler must land there."""
    s = linear_schedule(1000)
    model = ideal_conditional(s)
    n, scale = 4000, 2.5
    c = torch.tensor([0, 1]).repeat(n // 2)
    x = sample(guided(model, c, torch.tensor(2), scale), torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), s)
    for k in (0, 1):
        target = MUS[2] + scale * (MUS[k] - MUS[2])
        xk = x[c == k]
        torch.testing.assert_close(xk.mean(0), target, atol=0.05, rtol=0)
        torch.testing.assert_close(xk.var(0), torch.full((2,), VAR), atol=0.02, rtol=0)


def test_condition_dropout_rate():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 10, (20000,), generator=g)
    for p in (0.0, 0.1, 0.5, 1.0):
        out = drop_condition(c, torch.tensor(10), p, g)
        dropped = out == 10
        rate = dropped.float().mean().item()
        assert abs(rate - p) < 4 * (p * (1 - p) / len(c)) ** 0.5 + 1e-9, (p, rate)
        assert torch.equal(out[~dropped], c[~dropped])  # the others are untouched


def test_condition_dropout_on_token_sequences_drops_whole_captions():
    ids = torch.randint(2, 20, (5000, 7), generator=torch.Generator().manual_seed(0))
    out = drop_condition(ids, torch.zeros(7, dtype=torch.long), 0.2, torch.Generator().manual_seed(1))
    empty = (out == 0).all(1)
    assert torch.equal((out == 0).any(1), empty)  # a caption is dropped whole or not at all
    assert abs(empty.float().mean().item() - 0.2) < 0.03
    assert torch.equal(out[~empty], ids[~empty])


def test_condition_dropout_is_drawn_for_the_global_batch():
    """Data-parallel training: two processes with 4 rows each drop the rows one process with
    all 8 drops, given the same generator state."""
    cond = torch.arange(8)
    null = torch.tensor(10)
    one = drop_condition(cond, null, 0.5, torch.Generator().manual_seed(3))
    ranks = [drop_condition(cond[4 * r:4 * r + 4], null, 0.5, torch.Generator().manual_seed(3), rank=r, world=2)
             for r in range(2)]
    assert torch.equal(torch.cat(ranks), one)
    assert 0 < (one == 10).sum() < 8
    assert torch.equal(drop_condition(cond, null, 0.0, torch.Generator()), cond)
    assert torch.equal(drop_condition(cond, null, 1.0, torch.Generator()), torch.full_like(cond, 10))
    with pytest.raises(ValueError, match="rank must be"):
        drop_condition(cond, null, 0.5, rank=2, world=2)


def test_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        drop_condition(torch.zeros(3), torch.tensor(0.0), 1.5)
    with pytest.raises(ValueError, match="fits neither"):
        expand_null(torch.zeros(3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="conditions for a batch"):
        guided(lambda x, t, c: x, torch.zeros(3), torch.tensor(0.0), 2.0)(torch.zeros(4, 2), torch.zeros(4))
