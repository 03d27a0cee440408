"""The run's condition dropout (minildm.stages.drop_cond): the rows dropped depend on the
global batch only, not on how many processes share it."""

import torch

from minildm.distributed import Rank
from minildm.stages import drop_cond

CPU = torch.device("cpu")


def test_two_ranks_drop_the_same_rows_as_one_process():
    cond = torch.arange(16)  # class labels of a global batch of 16
    null = torch.full_like(cond, 10)
    one = drop_cond(cond, null, 0.5, torch.Generator().manual_seed(0), Rank(0, 1, CPU))
    halves = [drop_cond(cond[r * 8:(r + 1) * 8], null[:8], 0.5, torch.Generator().manual_seed(0), Rank(r, 2, CPU))
              for r in range(2)]
    assert torch.equal(torch.cat(halves), one)
    assert ((one == 10) | (one == cond)).all()


def test_dropout_rate_and_the_rows_it_keeps():
    cond = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(1))
    out = drop_cond(cond, torch.full_like(cond, 10), 0.1, torch.Generator().manual_seed(2), Rank(0, 1, CPU))
    rate = (out == 10).float().mean().item()
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / 20_000) ** 0.5  # within 4 standard errors
    kept = out != 10
    assert torch.equal(out[kept], cond[kept])


def test_token_conditions_are_dropped_whole():
    ids = torch.randint(2, 20, (64, 10), generator=torch.Generator().manual_seed(3))
    out = drop_cond(ids, torch.zeros_like(ids), 0.5, torch.Generator().manual_seed(4), Rank(0, 1, CPU))
    row_dropped = (out == 0).all(1)
    assert row_dropped.any() and (~row_dropped).any()
    assert torch.equal(out[~row_dropped], ids[~row_dropped])
