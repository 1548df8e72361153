"""Quality measures (ensemblekd.metrics) against hand-computed numbers."""

import math

import numpy as np
import pytest

from ensemblekd.metrics import accuracy, expected_calibration_error, mean_kl


def test_ece_with_15_equal_width_bins():
    probs = np.array([[0.9, 0.1], [0.78, 0.22], [0.3, 0.7], [0.72, 0.28], [1.0, 0.0]])
    y = np.array([0, 1, 1, 1, -1])  # the unlabelled last row is left out
    # bins (b/15, (b+1)/15]: 0.9 -> 13 (right), 0.78 -> 11 (wrong), 0.70 and 0.72 -> 10 (one right)
    expected = (1 * abs(1 - 0.9) + 1 * abs(0 - 0.78) + 2 * abs(0.5 - 0.71)) / 4
    assert expected_calibration_error(probs, y) == pytest.approx(expected)  # 0.325
    assert expected_calibration_error(probs, y, bins=1) == pytest.approx(abs(0.5 - 0.775))
    assert expected_calibration_error(probs, np.full(5, -1)) is None


def test_mean_kl_to_the_ensemble():
    target = np.array([[0.5, 0.5], [1.0, 0.0]])
    logits = np.array([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax: [0.25, 0.75], [0.5, 0.5]
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + math.log(2.0)) / 2
    assert mean_kl(target, logits) == pytest.approx(expected, rel=1e-6)
    assert mean_kl(target[1:], np.array([[5.0, 5.0]])) == pytest.approx(math.log(2.0), rel=1e-6)


def test_accuracy_counts_only_labelled_rows():
    pred = np.array([0, 1, 2, 2, 1])
    y = np.array([0, 2, 2, -1, -1])  # two of the three labelled rows are right; unlabelled rows are left out
    assert accuracy(pred, y) == pytest.approx(2 / 3)
    assert accuracy(pred, np.full(5, -1)) is None
