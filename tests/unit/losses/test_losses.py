"""The Hinton loss and the divergences of distill.loss against numbers computed by hand and plain formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from ensemblekd import config
from ensemblekd.errors import UserError
from ensemblekd.losses import DIVERGENCES, IGNORE, Divergence, kd_loss


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


def _reference(name, q, s, beta=0.5, alpha=0.1):
    """One row, plain Python floats: the divergence formula term by term, 0 · log 0 = 0 (s > 0)."""
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    def mix(a, b, share):
        return [share * x + (1 - share) * y for x, y in zip(a, b)]

    if name == "forward_kl":
        return kl(q, s)
    if name == "reverse_kl":
        return kl(s, q)
    if name == "jsd":
        m = mix(q, s, beta)
        return beta * kl(q, m) + (1 - beta) * kl(s, m)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(q, s))
    if name == "skew_kl":
        return kl(q, mix(q, s, alpha))
    assert name == "skew_reverse_kl"
    return kl(s, mix(s, q, alpha))


def _rows(n, c, seed, zeros=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, -1)
    if zeros:                                    # exact zeros in the target, renormalised
        q = q * (torch.rand(n, c, generator=g, dtype=torch.float64) > 0.3)
        q[:, 0] += 0.1
        q = q / q.sum(-1, keepdim=True)
    s = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, -1)
    return q, s


def test_divergence_names_are_the_config_keys():
    assert DIVERGENCES == config.DIVERGENCES
    with pytest.raises(UserError, match="distill.loss: unknown 'kl'; choose one of forward_kl, "):
        Divergence("kl")(torch.zeros(1, 2), torch.zeros(1, 2))


HAND = {  # q = (0.5, 0.5), s = (0.25, 0.75)
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    "forward_kl": 0.14384103622589042,
    # 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5)
    "reverse_kl": 0.13081203594113697,
    # m = (0.375, 0.625): 0.5 [0.5 ln(0.5/0.375) + 0.5 ln(0.5/0.625)] + 0.5 [0.25 ln(0.25/0.375) + 0.75 ln(0.75/0.625)]
    "jsd": 0.033822075568605205,
    # ½ (|0.5 − 0.25| + |0.5 − 0.75|)
    "tvd": 0.25,
    # m = 0.1 q + 0.9 s = (0.275, 0.725): 0.5 ln(0.5/0.275) + 0.5 ln(0.5/0.725)
    "skew_kl": 0.11313672216156873,
    # m = 0.1 s + 0.9 q = (0.475, 0.525): 0.25 ln(0.25/0.475) + 0.75 ln(0.75/0.525)
    "skew_reverse_kl": 0.10704273641095058,
}
HAND_ZERO = {  # q = (1, 0), s = (0.5, 0.5): the target's exact zero
    "forward_kl": 0.6931471805599453,        # 1 · ln(1/0.5) = ln 2
    # m = (0.75, 0.25): 0.5 ln(1/0.75) + 0.5 [0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)] = 0.75 ln(4/3)
    "jsd": 0.21576155433883565,
    "tvd": 0.5,                              # ½ (0.5 + 0.5)
    "skew_kl": 0.5978370007556204,           # m = (0.55, 0.45): ln(1/0.55)
    "skew_reverse_kl": 0.8303656034108255,   # m = (0.95, 0.05): 0.5 ln(0.5/0.95) + 0.5 ln(0.5/0.05)
}


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_matches_hand_computation(name):
    q, s = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    assert abs(Divergence(name)(q.log(), s.log()).item() - HAND[name]) < 1e-6
    assert abs(_reference(name, [0.5, 0.5], [0.25, 0.75]) - HAND[name]) < 1e-12
    out = Divergence(name)(torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.5, 0.5]]).log())
    if name == "reverse_kl":   # +inf in exact arithmetic: a large finite penalty (log q floored near −87)
        assert 40 < out.item() < 50
    else:
        assert abs(out.item() - HAND_ZERO[name]) < 1e-6
    # JSD with beta = 0.3: m = 0.3 q + 0.7 s = (0.325, 0.675)
    # 0.3 [0.5 ln(0.5/0.325) + 0.5 ln(0.5/0.675)] + 0.7 [0.25 ln(0.25/0.325) + 0.75 ln(0.75/0.675)]
    assert abs(Divergence("jsd", jsd_beta=0.3)(q.log(), s.log()).item() - 0.029002272984865407) < 1e-6


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_matches_the_plain_formula(name):
    d = Divergence(name, jsd_beta=0.3, skew_alpha=0.2)
    q, s = _rows(6, 5, 0, zeros=name != "reverse_kl")
    out = d(q.log(), s.log())
    assert out.shape == (6,) and out.dtype == torch.float64
    for row in range(6):
        ref = _reference(name, q[row].tolist(), s[row].tolist(), beta=0.3, alpha=0.2)
        assert abs(out[row].item() - ref) < 1e-12
    in_float32 = Divergence(name)(q.float().log(), s.float().log())
    assert torch.allclose(in_float32, Divergence(name)(q.log(), s.log()).float(), atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_properties(name):
    d = Divergence(name)
    q, s = _rows(50, 8, 1)
    assert torch.allclose(d(q.log(), q.log()), torch.zeros(50, dtype=torch.float64), atol=1e-12)   # 0 when q = s
    assert (d(q.log(), s.log()) >= 0).all()
    a, b = torch.tensor([[1.0 - 1e-12, 1e-12]]), torch.tensor([[1e-12, 1.0 - 1e-12]])     # nearly disjoint
    far = d(a.double().log(), b.double().log()).item()
    bound = {"tvd": 1.0, "jsd": math.log(2), "skew_kl": math.log(1 / 0.1), "skew_reverse_kl": math.log(1 / 0.1)}
    if name in bound:
        assert far <= bound[name] + 1e-12 and far > 0.99 * bound[name]                   # bounded, and tight
        assert (d(q.log(), s.log()) <= bound[name]).all()
    else:
        assert far > 20                                                                 # the KLs are unbounded


def test_forward_kl_is_f_kl_div_batchmean():
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(7, 10, generator=g) * 3, torch.randn(7, 10, generator=g) * 3
    p = torch.softmax(t / 2.0, -1)
    p[0, :3] = 0.0                                                                      # exact zeros too
    y = torch.full((7,), IGNORE)
    ref = F.kl_div(F.log_softmax(z / 2.0, -1), p, reduction="batchmean")
    for out in (kd_loss(z, p, y, 2.0, 0.0), kd_loss(z, p, y, 2.0, 0.0, divergence=Divergence("forward_kl"))):
        assert torch.allclose(out.kd, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_kd_loss_scales_every_divergence_by_t_squared_and_gradchecks(name):
    d = Divergence(name, jsd_beta=0.4, skew_alpha=0.2)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 5, generator=g, dtype=torch.float64), -1)
    y = torch.tensor([1, IGNORE, 4, 0])
    out = kd_loss(z, p, y, 3.0, 0.25, divergence=d)
    s = torch.softmax(z / 3.0, -1)
    kd = sum(_reference(name, p[r].tolist(), s[r].tolist(), 0.4, 0.2) for r in range(4)) / 4
    assert abs(out.kd.item() - kd) < 1e-12
    assert abs(out.loss.item() - (0.25 * out.ce.item() + 0.75 * 9.0 * kd)) < 1e-12
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, p, y, 3.0, 0.25, divergence=d).loss, z.requires_grad_())


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zeros_and_underflow_in_the_target_give_finite_gradients(name):
    z = torch.tensor([[30.0, -30.0, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])
    out = kd_loss(z, p, torch.full((2,), IGNORE), 1.0, 0.0, divergence=Divergence(name))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
