"""The trainer shuffles rows within a shard only: a shard whose rows come grouped by label would give
batches of one or two classes, and a student that learns nothing (the docstrings set, written in
module order, did). distill's preflight says so; this is the test of what it looks for."""

import numpy as np

from ensemblekd.tasks.classification import grouped_by_label


def test_sorted_or_blocked_labels_are_grouped_and_a_random_order_is_not():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 12, 256)
    assert not grouped_by_label(y)
    assert grouped_by_label(np.sort(y)) and grouped_by_label(np.sort(y)[::-1])
    blocks = np.repeat(rng.permutation(12), 20)  # sorted by something else that decides the label (a module)
    assert grouped_by_label(blocks)


def test_too_few_rows_or_one_class_say_nothing():
    assert not grouped_by_label(np.sort(np.random.default_rng(1).integers(0, 3, 20)))
    assert not grouped_by_label(np.zeros(256, dtype=np.int64))
    assert not grouped_by_label(np.full(256, -100))                 # no labels (IGNORE)
    assert not grouped_by_label(np.random.default_rng(2).integers(0, 2, 256))
