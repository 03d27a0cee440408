"""train_denoiser: it learns, it is reproducible, and it honours its options."""

import pytest
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


class _Recorder(torch.nn.Module):
    """A denoiser that remembers the conditions it was called with."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, xt, t, cond):
        self.seen.append(cond.clone())
        return xt * self.w


def test_condition_dropout_rate_in_training():
    rec = _Recorder()
    x0, labels = torch.randn(512, 2), torch.randint(0, 10, (512,))
    train_denoiser(rec, batches(x0, labels, batch_size=256), cosine_schedule(20), 40, cond_dropout=0.25,
                   null_cond=torch.tensor(10), generator=torch.Generator().manual_seed(0))
    seen = torch.cat(rec.seen)  # (40 * 256,)
    rate = (seen == 10).float().mean().item()
    assert abs(rate - 0.25) < 4 * (0.25 * 0.75 / len(seen)) ** 0.5
    rec = _Recorder()
    train_denoiser(rec, batches(x0, labels, batch_size=256), cosine_schedule(20), 5)
    assert not (torch.cat(rec.seen) == 10).any()  # no dropout by default


def test_condition_dropout_needs_a_null_condition():
    with pytest.raises(ValueError, match="needs null_cond"):
        train_denoiser(_Recorder(), batches(torch.randn(8, 2), torch.zeros(8), batch_size=4),
                       cosine_schedule(20), 1, cond_dropout=0.1)


def test_on_step_sees_every_step_with_growing_times():
    calls = []
    torch.manual_seed(0)
    net = MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=1))
    log = train_denoiser(net, batches(torch.randn(64, 2), batch_size=32), cosine_schedule(20), 7,
                         on_step=lambda step, seconds: calls.append((step, seconds)))
    assert [s for s, _ in calls] == list(range(7))
    times = [sec for _, sec in calls]
    assert times == sorted(times) and times[-1] <= log.seconds


def test_text_encoder_trains_jointly_with_the_unet():
    from minildm.data import make_shapes
    from minildm.text import TextConditionedUNet, TextEncoder, TextEncoderConfig, Tokenizer
    from minildm.unet import UNet, UNetConfig

    torch.manual_seed(0)
    tok = Tokenizer()
    model = TextConditionedUNet(
        UNet(UNetConfig(in_ch=3, out_ch=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        heads=2, groups=4, context_dim=16, image_size=8)),
        TextEncoder(TextEncoderConfig(dim=16, depth=1, heads=2)))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    data = make_shapes(32, seed=0, size=8)
    ids, _ = tok(data.captions)
    train_denoiser(model, batches(data.images, ids, batch_size=16), cosine_schedule(20), 3,
                   cond_dropout=0.1, null_cond=tok.null_ids(), generator=torch.Generator().manual_seed(0))
    assert all(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items()
               if k.endswith("weight"))


def test_clock_sets_the_budget():
    """A fake clock that advances 1 s per reading: max_seconds=5.5 stops after the step whose
    reading passes 5.5, whatever the real time."""
    ticks = iter(range(10**6))
    seen = []
    net = MLPDenoiser(MLPConfig(dim=2, hidden=8, depth=1))
    log = train_denoiser(net, batches(torch.randn(64, 2), batch_size=32), cosine_schedule(20), 100,
                         max_seconds=5.5, clock=lambda: float(next(ticks)),
                         on_step=lambda step, seconds: seen.append(seconds))
    # readings: start 0; per step on_step (1, 3, 5, ...) then the budget check (2, 4, 6, ...)
    assert seen == [1.0, 3.0, 5.0] and len(log.losses) == 3 and log.seconds == 7.0
