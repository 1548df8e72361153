"""Weighting rules (ensemblekd.mixing.rules) and mixing against hand-computed numbers."""

import torch

from ensemblekd.mixing import STRATEGIES, WEIGHTINGS, Parallel, Static, Uniform, mix, rule_maker


def test_uniform_weights():
    w = Uniform(["a", "b", "c", "d"])(torch.zeros(2, 4, 3))
    assert torch.allclose(w, torch.full((2, 4), 0.25))


def test_static_weights_are_normalised_in_teacher_order():
    w = Static(["a", "b"], weights={"b": 3.0, "a": 1.0})(torch.zeros(5, 2, 3))
    assert w.shape == (5, 2)
    assert torch.allclose(w[0], torch.tensor([0.25, 0.75]))


def test_mix_in_probability_space():
    z = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # one row, two teachers
    w = torch.tensor([[0.5, 0.5]])
    e = torch.exp(torch.tensor(1.0))  # T = 2: second teacher softmax([1, 0])
    second = torch.tensor([e / (e + 1), 1 / (e + 1)])
    expected = 0.5 * torch.tensor([0.5, 0.5]) + 0.5 * second
    assert torch.allclose(mix(z, w, 2.0, "prob")[0], expected)


def test_mix_in_logit_space():
    z = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    w = torch.tensor([[0.5, 0.5]])
    e = torch.exp(torch.tensor(0.5))  # averaged logits [1, 0] at T = 2 -> softmax([0.5, 0])
    assert torch.allclose(mix(z, w, 2.0, "logit")[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))


def test_mixed_targets_are_distributions():
    p, w = Parallel(["a", "b", "c"], rule_maker("static", weights={"a": 1, "b": 2, "c": 0})).targets(
        torch.randn(7, 3, 5), None, 3.0)
    assert torch.allclose(p.sum(-1), torch.ones(7))
    assert torch.allclose(w.sum(-1), torch.ones(7))


def test_one_teacher_with_weight_one_is_that_teacher():
    z = torch.randn(4, 2, 6)
    p, _ = Parallel(["a", "b"], rule_maker("static", weights={"a": 0, "b": 1})).targets(z, None, 1.5)
    assert torch.allclose(p, torch.softmax(z[:, 1] / 1.5, -1), atol=1e-6)


def test_registries_name_the_rules():
    assert {"uniform", "static"} <= set(WEIGHTINGS)
    assert "parallel" in STRATEGIES


# -- accuracy, entropy and CA-MKD, against numbers computed by hand ---------------------------
import math  # noqa: E402

import pytest  # noqa: E402

from ensemblekd.losses import IGNORE  # noqa: E402
from ensemblekd.mixing import CAMKD, Accuracy, Entropy  # noqa: E402
from ensemblekd.mixing.rules import entropy_weights  # noqa: E402

LN3 = math.log(3.0)
H_HALF = math.log(2.0)                                    # H([.5, .5])
H_QUARTER = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # H([.75, .25])


@pytest.mark.parametrize("gamma,expected", [(1.0, [0.6, 0.4]), (2.0, [0.81 / 1.17, 0.36 / 1.17]), (0.0, [0.5, 0.5])])
def test_accuracy_weights(gamma, expected):
    w = Accuracy(["a", "b"], val_accuracy={"a": 0.9, "b": 0.6}, gamma=gamma)(torch.zeros(3, 2, 4))
    assert torch.allclose(w, torch.tensor([expected] * 3), atol=1e-6)


def test_entropy_weights_two_teachers():
    z = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]])           # p_a = [.5, .5], p_b = [.75, .25]
    w = Entropy(["a", "b"])(z, None, 1.0)
    total = H_HALF + H_QUARTER
    assert torch.allclose(w[0], torch.tensor([1 - H_HALF / total, 1 - H_QUARTER / total]), atol=1e-6)
    assert w[0, 1] > w[0, 0]                               # the confident teacher weighs more


def test_entropy_weights_three_teachers_one_certain_and_temperature():
    z = torch.tensor([[[100.0, 0.0], [0.0, 0.0], [LN3, 0.0]]])
    w = entropy_weights(z, 1.0)[0]
    total = H_HALF + H_QUARTER                              # the certain teacher adds H = 0
    expected = torch.tensor([1.0, 1 - H_HALF / total, 1 - H_QUARTER / total]) / 2
    assert torch.allclose(w, expected, atol=1e-6) and abs(w.sum().item() - 1) < 1e-6
    # T = 2 softens p_b to softmax([ln3 / 2, 0])
    p = 1 / (1 + math.exp(-LN3 / 2))
    h_b = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    w2 = entropy_weights(z[:, 1:], 2.0)[0]
    assert torch.allclose(w2, torch.tensor([1 - H_HALF / (H_HALF + h_b), 1 - h_b / (H_HALF + h_b)]), atol=1e-6)


def test_entropy_ties_and_all_certain_are_uniform():
    same = torch.tensor([[[1.0, 2.0, 3.0]] * 4])
    assert torch.allclose(entropy_weights(same, 1.0), torch.full((1, 4), 0.25))
    certain = torch.tensor([[[100.0, 0.0], [0.0, 100.0]]])
    assert torch.allclose(entropy_weights(certain, 1.0), torch.full((1, 2), 0.5))


def test_ca_mkd_weights_two_teachers():
    z = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]])           # CE_a = ln 2, CE_b = -ln .75 for label 0
    w = CAMKD(["a", "b"])(z, torch.tensor([0]), 1.0)
    # softmax([ln 2, -ln .75]) = [2, 4/3] / (10/3) = [.6, .4]  ->  w = 1 - that
    assert torch.allclose(w[0], torch.tensor([0.4, 0.6]), atol=1e-6)


def test_ca_mkd_three_teachers_one_with_all_mass_on_the_label():
    z = torch.tensor([[[50.0, 0.0], [0.0, 0.0], [0.0, 50.0]]])  # right and sure, unsure, wrong and sure
    w = CAMKD(["a", "b", "c"])(z, torch.tensor([0]), 1.0)[0]
    ce = torch.tensor([math.log1p(math.exp(-50.0)), math.log(2.0), 50.0 + math.log1p(math.exp(-50.0))])
    expected = (1 - torch.softmax(ce, 0)) / 2
    assert torch.allclose(w, expected, atol=1e-6) and abs(w.sum().item() - 1) < 1e-6
    assert w[2] < 1e-6 and w[0] == pytest.approx(0.5, abs=1e-6)


def test_ca_mkd_rows_without_labels_fall_back_to_entropy():
    z = torch.tensor([[[0.0, 0.0], [LN3, 0.0]], [[0.0, 0.0], [LN3, 0.0]]])
    w = CAMKD(["a", "b"])(z, torch.tensor([0, IGNORE]), 2.0)
    assert torch.allclose(w[0], torch.tensor([0.4, 0.6]), atol=1e-6)
    assert torch.allclose(w[1], entropy_weights(z[1:], 2.0)[0])
    assert torch.allclose(CAMKD(["a", "b"])(z, None, 2.0), entropy_weights(z, 2.0))


def test_single_teacher_gets_weight_one_under_every_rule():
    z = torch.randn(5, 1, 3)
    for rule in (Entropy(["a"]), CAMKD(["a"])):
        assert torch.allclose(rule(z, torch.zeros(5, dtype=torch.long), 1.0), torch.ones(5, 1))
