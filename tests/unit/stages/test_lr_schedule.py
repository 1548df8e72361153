"""The student's learning-rate schedule (stages.train.lr_factor): a linear warm-up, then a cosine
decay to zero; without warm-up the cosine starts at once, as before the key existed."""

import math

import pytest

from ensemblekd.stages.train import lr_factor


def test_without_warmup_it_is_the_cosine_from_the_first_step():
    assert lr_factor(0, 100) == 1.0
    assert lr_factor(50, 100) == pytest.approx(0.5)
    assert lr_factor(100, 100) == pytest.approx(0.0, abs=1e-12)


def test_warmup_rises_linearly_then_decays():
    factors = [lr_factor(step, 100, 0.1) for step in range(101)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == 1.0 and max(factors) == 1.0
    assert factors[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[100] == pytest.approx(0.0, abs=1e-12)
