"""The Hinton loss against numbers computed by hand."""

import math

import torch

from ensemblekd.losses import IGNORE, kd_loss


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_loss_matches_hand_computation():
    z_s = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.25, 0.75]])
    T, alpha = 2.0, 0.3
    s_T = _softmax([0.5, 0.0])
    kl = 0.25 * (math.log(0.25) - math.log(s_T[0])) + 0.75 * (math.log(0.75) - math.log(s_T[1]))
    ce = -math.log(_softmax([1.0, 0.0])[1])  # label 1, at T = 1
    out = kd_loss(z_s, p, torch.tensor([1]), T, alpha)
    assert abs(out.kd.item() - kl) < 1e-6
    assert abs(out.ce.item() - ce) < 1e-6
    assert abs(out.loss.item() - (alpha * ce + (1 - alpha) * T * T * kl)) < 1e-6


def test_temperature_squared_scales_only_the_soft_term():
    z_s, p, y = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([0])
    a = kd_loss(z_s, p, y, 1.0, 0.0)
    b = kd_loss(z_s, p, y, 3.0, 0.0)
    assert abs(b.loss.item() - 9.0 * b.kd.item()) < 1e-6
    assert abs(a.loss.item() - a.kd.item()) < 1e-6


def test_alpha_one_is_plain_cross_entropy_and_zero_is_pure_kd():
    z_s, p, y = torch.randn(5, 4), torch.softmax(torch.randn(5, 4), -1), torch.tensor([0, 1, 2, 3, 0])
    hard = kd_loss(z_s, p, y, 4.0, 1.0)
    assert torch.allclose(hard.loss, torch.nn.functional.cross_entropy(z_s, y))
    soft = kd_loss(z_s, p, y, 4.0, 0.0)
    assert torch.allclose(soft.loss, 16.0 * soft.kd)


def test_unlabelled_rows_contribute_only_the_soft_term():
    z_s = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    p = torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.8, 0.2]])
    y = torch.tensor([0, IGNORE, IGNORE])
    out = kd_loss(z_s, p, y, 2.0, 0.5)
    # CE over the labelled row only; KL averaged over all three rows
    assert abs(out.ce.item() - (-math.log(_softmax([1.0, 0.0])[0]))) < 1e-6
    per_row = []
    for zi, pi in zip(z_s.tolist(), p.tolist()):
        s = _softmax([v / 2.0 for v in zi])
        per_row.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(pi, s)))
    assert abs(out.kd.item() - sum(per_row) / 3) < 1e-6


def test_a_batch_without_labels_has_zero_ce_and_a_gradient():
    z_s = torch.randn(3, 4, requires_grad=True)
    out = kd_loss(z_s, torch.softmax(torch.randn(3, 4), -1), torch.full((3,), IGNORE), 2.0, 0.5)
    assert out.ce.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0
