"""The diffusion loss of a run's micro-batch (minildm.stages.diffusion_terms): t, eps and the
condition dropout are drawn for the global batch, so what each row sees does not depend on
how many processes share the batch."""

import torch

from minildm.config import DiffusionConfig, TrainConfig
from minildm.distributed import Rank
from minildm.schedules import cosine_schedule
from minildm.stages import diffusion_terms

CPU = torch.device("cpu")
NULL = 10


class Recorder(torch.nn.Module):
    """A conditional 'denoiser' that predicts zeros and remembers what it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, xt, t, cond):
        self.seen.append((xt, t, cond))
        return torch.zeros_like(xt)


def run(x0, cond, rank, world, seed=0):
    model = Recorder()
    config = TrainConfig(diffusion=DiffusionConfig(cond_drop=0.5))
    terms = diffusion_terms(model, x0, cond, torch.tensor(NULL), cosine_schedule(100), config,
                            torch.Generator().manual_seed(seed), Rank(rank, world, CPU))
    return terms["loss"], model.seen[0]


def test_two_processes_see_what_one_process_sees():
    x0 = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(1))  # a global batch of 16
    cond = torch.arange(16) % 10
    loss, (xt, t, c) = run(x0, cond, 0, 1)
    halves = [run(x0[r * 8:(r + 1) * 8], cond[r * 8:(r + 1) * 8], r, 2) for r in range(2)]
    torch.testing.assert_close(torch.cat([h[1][0] for h in halves]), xt)  # same t and eps per row
    assert torch.equal(torch.cat([h[1][1] for h in halves]), t)
    assert torch.equal(torch.cat([h[1][2] for h in halves]), c)  # the same rows dropped
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, loss)  # DDP's mean of the two losses
    dropped = c == NULL
    assert 0 < dropped.sum() < 16 and torch.equal(c[~dropped], cond[~dropped])


def test_the_loss_is_the_mean_squared_eps_for_a_zero_prediction():
    """With 'simple' weighting and eps prediction, a model that predicts 0 has loss E||eps||^2 = 1."""
    x0 = torch.zeros(4096, 1, 2, 2)
    loss, _ = run(x0, torch.zeros(4096, dtype=torch.long), 0, 1)
    assert abs(loss.item() - 1.0) < 0.05
