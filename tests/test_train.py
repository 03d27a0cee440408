"""train_denoiser: it learns, it is reproducible, and it honours its options."""

import torch

from minildm.data import batches
from minildm.diffusion import broadcast, gaussian_eps
from minildm.mlp import MLPConfig, MLPDenoiser
from minildm.schedules import cosine_schedule
from minildm.train import train_denoiser


def _run(steps=300, seed=0, bf16=False):
    torch.manual_seed(seed)
    x0 = torch.randn(4096, 2) * 0.5 + torch.tensor([1.0, -1.0])
    net = MLPDenoiser(MLPConfig(dim=2, hidden=64, depth=2))
    s = cosine_schedule(50)
    log = train_denoiser(net, batches(x0, batch_size=256, seed=seed), s, steps, lr=3e-3,
                         bf16=bf16, generator=torch.Generator().manual_seed(seed))
    return net, s, log


def test_learns_the_exact_gaussian_denoiser():
    """Trained on Gaussian data, the network approaches E[eps | x_t], the best possible denoiser."""
    net, s, log = _run()
    assert sum(log.losses[-50:]) / 50 < 0.8 * sum(log.losses[:10]) / 10
    xt, t = torch.randn(2000, 2), torch.randint(0, 50, (2000,)).float()
    ab = broadcast(s.alpha_bar_at(t), xt)
    ideal = gaussian_eps(xt, ab, torch.tensor([1.0, -1.0]), 0.25)
    with torch.no_grad():
        err = (net(xt, t) - ideal).pow(2).mean()
    assert float(err) < 0.1 * float(ideal.pow(2).mean()), float(err)  # within 10% of the signal


def test_reproducible_and_leaves_model_in_eval_mode():
    a, _, la = _run(steps=20)
    b, _, lb = _run(steps=20)
    assert la.losses == lb.losses
    assert not a.training
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_bf16_autocast_trains():
    _, _, log = _run(steps=100, bf16=True)
    assert all(torch.isfinite(torch.tensor(log.losses)))
    assert sum(log.losses[-20:]) / 20 < sum(log.losses[:10]) / 10


def test_max_seconds_stops_early():
    torch.manual_seed(0)
    net = MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=1))
    log = train_denoiser(net, batches(torch.randn(64, 2), batch_size=32), cosine_schedule(20), 10**6, max_seconds=0.2)
    assert 0 < len(log.losses) < 10**6 and log.seconds < 5
