"""Token-level soft targets (ensemblekd.topk): top-k + tail against dense KL, every divergence of
distill.loss, and numbers computed by hand.
(How they are stored, the token task's codec, is tested in tests/unit/tasks/test_token_codec.py.)"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemblekd import topk
from ensemblekd.losses import DIVERGENCES, IGNORE, Divergence
from ensemblekd.mixing import CAMKD, Entropy
from ensemblekd.topk import (
    dense_from_topk,
    index_dtype,
    rule_inputs,
    sparse_divergence,
    token_loss,
    topk_targets,
)


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def _targets(teacher_logits: torch.Tensor, k: int):
    """Stacked per-teacher top-k targets of logits [N, K, V]: logp, idx [N, K, k], tail [N, K]."""
    per = [topk_targets(teacher_logits[:, j], k) for j in range(teacher_logits.shape[1])]
    return tuple(np.stack(x, axis=1) for x in zip(*per))


def test_index_dtype_is_the_narrowest():
    assert index_dtype(2) == np.uint8 and index_dtype(256) == np.uint8
    assert index_dtype(257) == np.uint16 and index_dtype(65536) == np.uint16
    assert index_dtype(65537) == np.uint32 and index_dtype(128256) == np.uint32


def test_topk_values_come_from_the_full_softmax_and_tail_is_the_rest():
    z = torch.randn(9, 40, generator=torch.Generator().manual_seed(0)) * 3
    logp, idx, tail = topk_targets(z, 5, chunk_tokens=4)
    full = F.log_softmax(z.double(), dim=-1)
    assert logp.dtype == np.float16 and idx.dtype == np.uint8 and tail.dtype == np.float16
    assert np.all(np.diff(logp.astype(np.float32), axis=1) <= 0)                      # descending
    exact = full.gather(-1, torch.from_numpy(idx.astype(np.int64)))
    assert torch.allclose(torch.from_numpy(logp).double(), exact, atol=5e-3)           # not renormalised
    assert torch.equal(torch.from_numpy(idx.astype(np.int64)), full.topk(5).indices)
    rest = torch.log1p(-exact.exp().sum(-1))
    assert torch.allclose(torch.from_numpy(tail).double(), rest, atol=5e-3)
    assert (torch.from_numpy(logp).double().exp().sum(-1) < 1).all()
    logp, idx, tail = topk_targets(z[:, :6], 10)                                       # k > V: k = V
    assert logp.shape == (9, 6) and np.isneginf(tail).all()


def test_full_k_equals_dense_kl():
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(6, 7, generator=g) * 2, torch.randn(6, 7, generator=g) * 2
    lp_t = F.log_softmax(t, -1)
    logp, idx = lp_t.topk(7)
    tail = torch.full((6,), -math.inf)
    for T in (1.0, 2.0, 4.0):
        dense = F.kl_div(F.log_softmax(z / T, -1), F.softmax(t / T, -1), reduction="batchmean")
        sparse = sparse_divergence(z, logp[:, None], idx[:, None], tail[:, None], 7, T)
        assert abs(sparse.item() - dense.item()) < 1e-5


def test_gradient_matches_dense_kl():
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    logp, idx = F.log_softmax(t, -1).topk(6)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    F.kl_div(F.log_softmax(z1 / 2, -1), F.softmax(t / 2, -1), reduction="batchmean").backward()
    sparse_divergence(z2, logp[:, None], idx[:, None], torch.full((5, 1), -math.inf), 6, 2.0, chunk_tokens=2).backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


def test_small_k_matches_hand_computation_with_the_tail():
    # V = 5, teacher p = [0.1, 0.3, 0.06, 0.5, 0.04]: top-2 are ids 3 and 1, tail r = 0.2 over ids {0, 2, 4}
    p = [0.1, 0.3, 0.06, 0.5, 0.04]
    z = [1.0, 0.0, 0.5, -0.5, 0.2]
    logp = torch.tensor([[[math.log(0.5), math.log(0.3)]]])
    idx = torch.tensor([[[3, 1]]])
    tail = torch.tensor([[math.log(0.2)]])
    for T in (1.0, 2.0):
        # teacher buckets: 0.5^(1/T), 0.3^(1/T), and the tail as 3 ids of 0.2/3 each, tempered
        raw = [0.5 ** (1 / T), 0.3 ** (1 / T), 3 * (0.2 / 3) ** (1 / T)]
        q = [x / sum(raw) for x in raw]
        s = _softmax([x / T for x in z])
        s_b = [s[3], s[1], s[0] + s[2] + s[4]]
        kl = sum(qi * (math.log(qi) - math.log(si)) for qi, si in zip(q, s_b))
        if T == 1.0:
            assert abs(q[2] - 0.2) < 1e-12 and abs(sum(p) - 1) < 1e-12
        out = sparse_divergence(torch.tensor([z]), logp, idx, tail, 5, T)
        assert abs(out.item() - kl) < 1e-6


def test_mask_excludes_padding_even_nan():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 6, generator=g)
    logp, idx, tail = (torch.from_numpy(x) for x in _targets(torch.randn(4, 2, 6, generator=g), 2))
    idx = idx.long()
    ref = sparse_divergence(z[:2], logp[:2], idx[:2], tail[:2], 6, 2.0)
    z_pad = z.clone()
    z_pad[2:] = float("nan")
    logp[2:], tail[2:], idx[2:] = float("nan"), float("inf"), 10_000          # garbage, out of range too
    z_pad.requires_grad_()
    out = sparse_divergence(z_pad, logp, idx, tail, 6, 2.0, mask=torch.tensor([True, True, False, False]))
    assert torch.allclose(out, ref)
    out.backward()
    assert torch.isfinite(z_pad.grad).all() and (z_pad.grad[2:] == 0).all() and (z_pad.grad[:2] != 0).any()


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(9, 30, generator=g)
    logp, idx, tail = _targets(torch.randn(9, 3, 30, generator=g) * 2, 4)
    w = torch.softmax(torch.randn(9, 3, generator=g), -1)
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    grads = []
    for chunk in (2, 1024):
        zz = z.clone().requires_grad_()
        out = sparse_divergence(zz, logp, idx, tail, 30, 3.0, weights=w, mask=mask, chunk_tokens=chunk)
        out.backward()
        grads.append((out.detach(), zz.grad))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], atol=1e-7)


def test_weights_mix_per_teacher_terms():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 20, generator=g)
    logp, idx, tail = _targets(torch.randn(3, 2, 20, generator=g) * 2, 3)
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]])
    per = [[sparse_divergence(z[n:n + 1], logp[n:n + 1, j:j + 1], idx[n:n + 1, j:j + 1], tail[n:n + 1, j:j + 1],
                              20, 2.0) for j in range(2)] for n in range(3)]
    expected = sum(w[n, 0] * per[n][0] + w[n, 1] * per[n][1] for n in range(3)) / 3
    assert torch.allclose(sparse_divergence(z, logp, idx, tail, 20, 2.0, weights=w), expected)
    uniform = sum(0.5 * per[n][0] + 0.5 * per[n][1] for n in range(3)) / 3
    assert torch.allclose(sparse_divergence(z, logp, idx, tail, 20, 2.0), uniform)


def test_token_loss_combines_ce_and_scaled_kd_over_unmasked_labelled_tokens():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 12, generator=g, requires_grad=True)
    logp, idx, tail = _targets(torch.randn(5, 2, 12, generator=g), 4)
    labels = torch.tensor([3, IGNORE, 7, 1, 2])
    mask = torch.tensor([True, True, True, False, True])
    out = token_loss(z, labels, logp, idx, tail, 12, 2.0, 0.3, mask=mask)
    keep = torch.tensor([0, 2, 4])
    assert torch.allclose(out.ce, F.cross_entropy(z[keep], labels[keep]))
    assert torch.allclose(out.kd, sparse_divergence(z, logp, idx, tail, 12, 2.0, mask=mask))
    assert torch.allclose(out.loss, 0.3 * out.ce + 0.7 * 4.0 * out.kd)
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and (z.grad[3] == 0).all()
    none = token_loss(z, torch.full((5,), IGNORE), logp, idx, tail, 12, 2.0, 0.3)
    assert none.ce.item() == 0.0


def test_rule_inputs_isolate_the_label_and_feed_camkd_without_nan():
    v = 10
    p_good = torch.tensor([0.6, 0.2, 0.05, 0.05, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01])   # label 0: p = 0.6
    p_bad = torch.tensor([0.02, 0.5, 0.3, 0.04, 0.04, 0.04, 0.03, 0.01, 0.01, 0.01])   # label 0 in its tail
    logp, idx, tail = _targets(torch.stack([p_good, p_bad]).log().expand(3, 2, v), 3)
    labels = torch.tensor([0, IGNORE, 2])
    buckets, bucket_labels = rule_inputs(logp, idx, tail, labels, v)
    assert buckets.shape == (3, 2, 5) and bucket_labels.tolist() == [0, IGNORE, 0]
    assert torch.allclose(buckets.logsumexp(-1), torch.zeros(3, 2), atol=2e-3)           # exact distributions
    assert abs(buckets[0, 0, 0].exp().item() - 0.6) < 1e-3                               # from its top-k
    assert abs(buckets[0, 1, 0].exp().item() - (1 - 0.5 - 0.3 - 0.04) / 7) < 1e-3        # even-tail estimate
    assert abs(buckets[2, 1, 0].exp().item() - 0.3) < 1e-3                               # label 2 in top-k ...
    assert buckets[2, 1, 1:4].exp().sum().item() < 0.55                                  # ... and out of it
    assert (buckets[1, :, 0] == topk.EMPTY_LOGIT).all()                                # no label, empty
    w = CAMKD(["good", "bad"])(buckets, bucket_labels, 2.0)
    assert torch.isfinite(w).all() and w[0, 0] > w[0, 1] and w[2, 1] > w[2, 0]
    assert torch.allclose(w.sum(-1), torch.ones(3))
    assert torch.isfinite(Entropy(["good", "bad"])(buckets, bucket_labels, 2.0)).all()
    full_logp, full_idx, full_tail = _targets(torch.stack([p_good, p_bad]).log().expand(3, 2, v), v)   # k = V
    b, _ = rule_inputs(full_logp, full_idx, full_tail, labels, v)
    assert torch.isfinite(CAMKD(["a", "b"])(b, _, 1.0)).all() and torch.isfinite(Entropy(["a", "b"])(b, _, 1.0)).all()


def test_dense_from_topk_spreads_the_tail_evenly():
    p = torch.tensor([[0.5, 0.1, 0.3, 0.06, 0.04]])
    logp, idx, tail = topk_targets(p.log(), 2)
    d = dense_from_topk(logp, idx, tail, 5)
    assert torch.allclose(d, torch.tensor([[0.5, 0.2 / 3, 0.3, 0.2 / 3, 0.2 / 3]]), atol=1e-3)
    logp, idx, tail = topk_targets(p.log(), 5)
    assert torch.allclose(dense_from_topk(logp, idx, tail, 5), p, atol=1e-3)


def _reference_kl(z, logp, idx, tail, v, T, w):
    """The formula term by term with plain autograd: no chunks, no hand-written gradient."""
    log_s = F.log_softmax(z / T, -1)
    total = 0.0
    for n in range(z.shape[0]):
        for j in range(idx.shape[1]):
            top = idx[n, j].tolist()
            other = [i for i in range(v) if i not in top]
            a = torch.cat([logp[n, j] / T, (math.log(len(other)) + (tail[n, j] - math.log(len(other))) / T).view(1)])
            log_q = a - a.logsumexp(0)
            log_sb = torch.cat([log_s[n, top], log_s[n, other].logsumexp(0).view(1)])
            total = total + w[n, j] * (log_q.exp() * (log_q - log_sb)).sum()
    return total / z.shape[0]


def test_gradient_matches_autograd_of_the_formula():
    g = torch.Generator().manual_seed(8)
    n, v = 5, 9
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    lp, ix, tl = _targets(torch.randn(n, 3, v, generator=g) * 2, 3)
    logp, idx, tail = _as64(lp, ix, tl)
    w = torch.softmax(torch.randn(n, 3, generator=g), -1)
    for T in (1.0, 3.0):
        z1, z2 = z.clone().requires_grad_(), z.float().requires_grad_()
        ref = _reference_kl(z1, logp, idx, tail, v, T, w.double())
        ref.backward()
        out = sparse_divergence(z2, logp, idx, tail, v, T, weights=w, chunk_tokens=2)
        (2.5 * out).backward()
        assert abs(out.item() - ref.item()) < 1e-5
        assert torch.allclose(z2.grad.double(), 2.5 * z1.grad, atol=1e-6)


def _dense_div(d: Divergence, q, s):
    """Plain formulas over full distributions (q, s > 0 here), written apart from losses.Divergence."""
    def kl(a, b):
        return (a * (a.log() - b.log())).sum()

    b, a = d.jsd_beta, d.skew_alpha
    return {"forward_kl": lambda: kl(q, s),
            "reverse_kl": lambda: kl(s, q),
            "jsd": lambda: b * kl(q, b * q + (1 - b) * s) + (1 - b) * kl(s, b * q + (1 - b) * s),
            "tvd": lambda: 0.5 * (q - s).abs().sum(),
            "skew_kl": lambda: kl(q, a * q + (1 - a) * s),
            "skew_reverse_kl": lambda: kl(s, a * s + (1 - a) * q)}[d.name]()


def _dense_reference(d, z, logp, idx, tail, v, T, w, mask=None, fixed_tail=False):
    """Σ_k w_k D(q̃_k, s) over the full vocabulary, masked mean over tokens, plain autograd: s the
    dense student, q̃_k teacher k's tempered top-k with its tail mass shaped as the student's tail,
    q̃_j = q_tail · s_j / s_tail (held fixed with fixed_tail: the gradient is the same)."""
    s_all = F.softmax(z / T, -1)
    total, count = 0.0, 0
    for n in range(z.shape[0]):
        if mask is not None and not mask[n]:
            continue
        count += 1
        s = s_all[n]
        for j in range(idx.shape[1]):
            top = idx[n, j].tolist()
            other = [i for i in range(v) if i not in top]
            raw = (logp[n, j] / T).exp()
            if other:   # the tail as len(other) ids of r / len(other) each, tempered
                raw = torch.cat([raw, (len(other) * ((tail[n, j] - math.log(len(other))) / T).exp()).view(1)])
            q_b = raw / raw.sum()
            q = torch.zeros(v, dtype=z.dtype)
            q[top] = q_b[:len(top)]
            if other:
                s_other = s[other].detach() if fixed_tail else s[other]
                q[other] = q_b[-1] * s_other / s_other.sum()
            total = total + w[n, j] * _dense_div(d, q, s)
    return total / max(1, count)


def _as64(logp, idx, tail):
    return torch.from_numpy(logp).double(), torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(tail).double()


def _check_against_dense(d, z, logp, idx, tail, v, T, w, mask=None, atol=1e-6):
    z64, zz = z.detach().double().requires_grad_(), z.detach().float().clone().requires_grad_()
    ref = _dense_reference(d, z64, logp, idx, tail, v, T, w.double(), mask)
    ref.backward()
    out = sparse_divergence(zz, logp, idx, tail, v, T, weights=w, mask=mask, chunk_tokens=3, divergence=d)
    (2.5 * out).backward()
    assert abs(out.item() - ref.item()) < 1e-5
    assert torch.allclose(zz.grad.double(), 2.5 * z64.grad, atol=atol)
    z_fixed = z.detach().double().requires_grad_()
    _dense_reference(d, z_fixed, logp, idx, tail, v, T, w.double(), mask, fixed_tail=True).backward()
    assert torch.allclose(z_fixed.grad, z64.grad, atol=1e-10)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_equals_the_dense_one_with_the_student_shaped_tail(name):
    d = Divergence(name, jsd_beta=0.3, skew_alpha=0.2)
    g = torch.Generator().manual_seed(9)
    n, v = 7, 11
    z = torch.randn(n, v, generator=g) * 2
    logp, idx, tail = _as64(*_targets(torch.randn(n, 3, v, generator=g) * 2, 4))
    w = torch.softmax(torch.randn(n, 3, generator=g), -1)
    w[0] = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    for T in (1.0, 2.5):
        _check_against_dense(d, z, logp, idx, tail, v, T, w, mask)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_with_k_equal_v_is_the_dense_divergence(name):
    d = Divergence(name)
    g = torch.Generator().manual_seed(10)
    n, v = 5, 6
    z, t = torch.randn(n, v, generator=g) * 2, torch.randn(n, 2, v, generator=g) * 2
    lp, ix, tl = _targets(t, v)
    assert np.isneginf(tl).all()
    w = torch.tensor([[0.3, 0.7]]).expand(n, 2)
    _check_against_dense(d, z, *_as64(lp, ix, tl), v, 2.0, w)
    out = sparse_divergence(z, lp, ix, tl, v, 2.0, weights=w, divergence=d)             # the teachers' own softmax
    s = F.softmax(z.double() / 2, -1)
    q = F.softmax(t.double() / 2, -1)
    dense = sum(w[r, j] * _dense_div(d, q[r, j], s[r]) for r in range(n) for j in range(2)) / n
    assert abs(out.item() - dense.item()) < 2e-3                                          # float16 log-probs


@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_on_peaked_tokens_takes_the_exact_path(name):
    d = Divergence(name)
    g = torch.Generator().manual_seed(11)
    n, v, k = 4, 12, 3
    t = torch.randn(n, 2, v, generator=g) * 2
    logp, idx, tail = _as64(*_targets(t, k))
    z = torch.randn(n, v, generator=g)
    z[:2].scatter_(-1, idx[:2, 0], 12.0)          # tokens 0, 1: the student's mass on teacher 0's top-k
    kept = F.softmax(z.double(), -1).gather(-1, idx.view(n, -1)).view(n, 2, k).sum(-1)
    assert (kept[:2, 0] > topk.DIRECT_TAIL_MASS).all() and (kept[2:] < topk.DIRECT_TAIL_MASS).all()
    assert (1 - kept[:2, 0] < 1e-4).all()
    w = torch.tensor([[0.6, 0.4]]).expand(n, 2)
    _check_against_dense(d, z, logp, idx, tail, v, 1.0, w)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_the_buckets_bound_the_true_divergence_from_below_at_t_1(name):
    d = Divergence(name)
    g = torch.Generator().manual_seed(12)
    z, t = torch.randn(6, 15, generator=g) * 2, torch.randn(6, 1, 15, generator=g) * 2
    lp, ix, tl = _targets(t, 3)
    out = sparse_divergence(z, lp, ix, tl, 15, 1.0, divergence=d)
    s, q = F.softmax(z.double(), -1), F.softmax(t[:, 0].double(), -1)
    full = sum(_dense_div(d, q[r], s[r]) for r in range(6)) / 6
    assert 0 <= out.item() <= full.item() + 1e-3


def test_token_loss_passes_the_divergence():
    g = torch.Generator().manual_seed(13)
    z = torch.randn(5, 12, generator=g, requires_grad=True)
    logp, idx, tail = _targets(torch.randn(5, 2, 12, generator=g), 4)
    labels = torch.tensor([3, IGNORE, 7, 1, 2])
    d = Divergence("jsd", jsd_beta=0.2)
    out = token_loss(z, labels, logp, idx, tail, 12, 2.0, 0.3, divergence=d)
    assert torch.allclose(out.kd, sparse_divergence(z, logp, idx, tail, 12, 2.0, divergence=d))
    assert not torch.allclose(out.kd, sparse_divergence(z, logp, idx, tail, 12, 2.0))
    assert torch.allclose(out.loss, 0.3 * out.ce + 0.7 * 4.0 * out.kd)
    labels_only = token_loss(z, labels, logp, idx, tail, 12, 2.0, 1.0, divergence=d)     # alpha 1: reported only
    assert torch.allclose(labels_only.kd, out.kd) and not labels_only.kd.requires_grad
