"""The run's data order (minildm.rundata.ResumableBatches): what exact resume and DDP rest on."""

from itertools import islice

import pytest

from minildm.data import DataError
from minildm.rundata import ResumableBatches


def take(sampler, k):
    return list(islice(iter(sampler), k))


def test_resuming_at_k_continues_the_same_stream_across_epochs():
    full = take(ResumableBatches(n=50, global_batch=8, rank=0, world=1, seed=3), 20)  # 6 per epoch: 3+ epochs
    for k in (0, 5, 6, 13):
        assert take(ResumableBatches(n=50, global_batch=8, rank=0, world=1, seed=3, start=k), 20 - k) == full[k:]


def test_an_epoch_visits_each_row_at_most_once_and_epochs_differ():
    batches = take(ResumableBatches(n=50, global_batch=8, rank=0, world=1, seed=0), 12)
    first, second = sum(batches[:6], []), sum(batches[6:], [])
    assert len(set(first)) == 48 and len(set(second)) == 48  # 50 // 8 = 6 full batches, 2 rows dropped
    assert first != second


def test_ranks_split_each_global_batch_into_disjoint_equal_parts():
    one = take(ResumableBatches(n=64, global_batch=8, rank=0, world=1, seed=1), 10)
    parts = [take(ResumableBatches(n=64, global_batch=8, rank=r, world=4, seed=1), 10) for r in range(4)]
    for k in range(10):
        assert sum((p[k] for p in parts), []) == one[k]  # rank r holds rows [2r, 2r + 2) of the same batch


def test_a_dataset_smaller_than_one_batch_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one micro-batch"):
        ResumableBatches(n=5, global_batch=8, rank=0, world=1, seed=0)
