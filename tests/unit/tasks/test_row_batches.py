"""row_batches: the trainer's batches over shards, the next shard read while this one is used."""

import threading
import time

import numpy as np
import pytest

from ensemblekd.errors import UserError
from ensemblekd.tasks.base import READ_AHEAD, row_batches


def _rows(batch):
    return [int(data[i]) for data, idx in batch for i in idx]


def test_the_next_shards_are_read_while_this_one_is_used_and_no_further():
    assert READ_AHEAD == 2
    started, threads = [], set()

    def read(shard):
        started.append(shard)
        threads.add(threading.current_thread().name)
        return np.arange(10) + 100 * shard

    batches = row_batches([(0, 0, 10), (1, 2, 8), (2, 0, 10), (3, 0, 2)], read, 4, None)
    first = next(batches)
    deadline = time.monotonic() + 10
    while len(started) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert sorted(started) == [0, 1, 2]  # 1 and 2 in the background; 3 waits until shard 0 is used up
    rest = list(batches)
    assert [_rows(b) for b in [first, *rest]] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 102, 103], [104, 105, 106, 107], [200, 201, 202, 203],
        [204, 205, 206, 207], [208, 209, 300, 301]]
    assert sorted(started) == [0, 1, 2, 3] and all(name.startswith("ekd-read-ahead") for name in threads)


def test_a_read_error_surfaces_when_its_shard_is_reached():
    def read(shard):
        if shard == 1:
            raise UserError("shard 1 is corrupt")
        return np.arange(4)

    batches = row_batches([(0, 0, 4), (1, 0, 4)], read, 2, None)
    assert [_rows(b) for b in (next(batches), next(batches))] == [[0, 1], [2, 3]]
    with pytest.raises(UserError, match="shard 1 is corrupt"):
        next(batches)


def test_shuffled_rows_stay_within_their_segment():
    batches = list(row_batches([(0, 0, 6), (1, 0, 6)], lambda s: np.arange(6) + 10 * s, 4,
                               np.random.default_rng(0)))
    rows = [r for b in batches for r in _rows(b)]
    assert sorted(rows[:6]) == list(range(6)) and sorted(rows[6:]) == list(range(10, 16)) and rows[:6] != list(range(6))
