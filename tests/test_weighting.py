"""Weighting rules and mixing against hand-computed numbers."""

import torch

from ensemblekd.weighting import STRATEGIES, WEIGHTINGS, Parallel, Static, Uniform, mix


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
    p, w = Parallel(["a", "b", "c"], weighting="static", weights={"a": 1, "b": 2, "c": 0}).targets(
        torch.randn(7, 3, 5), None, 3.0)
    assert torch.allclose(p.sum(-1), torch.ones(7))
    assert torch.allclose(w.sum(-1), torch.ones(7))


def test_one_teacher_with_weight_one_is_that_teacher():
    z = torch.randn(4, 2, 6)
    p, _ = Parallel(["a", "b"], weighting="static", weights={"a": 0, "b": 1}).targets(z, None, 1.5)
    assert torch.allclose(p, torch.softmax(z[:, 1] / 1.5, -1), atol=1e-6)


def test_registries_name_the_rules():
    assert {"uniform", "static"} <= set(WEIGHTINGS)
    assert "parallel" in STRATEGIES
