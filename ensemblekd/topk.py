"""Token-level soft targets for causal-LM distillation: top-k log-probs plus a tail bucket.

A full row of a 128k vocabulary is 256 KB in float16, so per token a teacher keeps only its k
most likely ids, their log-probabilities taken from the FULL softmax at T = 1 (not renormalised
over the k), and the log of the mass left outside them, log r (r = 1 − Σ_topk p_i, computed as a
logsumexp of the other log-probs, which keeps its precision when r is tiny).

The KD term of one token against teacher k, over k + 1 buckets (its top-k ids and the tail):

    q_i    ∝ exp(log p_i / T)                                   i in top-k
    q_tail ∝ (V − k) · exp((log r − log(V − k)) / T)            the tail, spread evenly over V − k ids
    s      = softmax(z / T) over the full vocabulary,  s_tail = Σ_{j ∉ top-k} s_j (a logsumexp)
    D_k    = D(q, s) over the buckets (q_1 .. q_k, q_tail) and (s_1 .. s_k, s_tail)

D is distill.loss (losses.Divergence), forward KL by default: Σ_b q_b (log q_b − log s_b),
0 · log 0 = 0. q is normalised over the k + 1 buckets. Spreading r evenly makes tempering act on
each tail id as it would on the full distribution; at T = 1 the buckets are the teacher's exact
masses. Then

    L_kd = Σ_tokens mask · Σ_k w_k D_k / max(1, Σ mask)             (the caller multiplies by T²)

What the buckets compute. All six divergences are f-divergences, D(q, s) = Σ_j s_j f(q_j / s_j).
Let q̃_k be teacher k with its tail mass shaped like the student's tail, q̃_kj = q_tail · s_j / s_tail
for j outside its top-k: then q̃_kj / s_j is the same over the tail and D_k = D(q̃_k, s) exactly,
over the full vocabulary. Against the teacher's true tail (not stored) D_k is a lower bound (data
processing: merging ids into one bucket never increases an f-divergence; at T ≠ 1 the bucket's
mass itself assumes an even tail); exact when k = V.

Several teachers: D is applied per teacher and summed with the strategy's weights, Σ_k w_k D(q_k, s).
For forward KL that has the gradient of D(Σ_k w_k q_k, s) (they differ by a term of the teachers
alone); for the others it is the per-teacher form, which upper-bounds D(mixture, s) since every
f-divergence is convex in q. Classification (losses.kd_loss) mixes first, then applies D.

Its gradient, computed chunk by chunk in the forward (no [N, V] activation is kept for autograd):
with h_kb = ∂(Σ_k w_k D_k) / ∂ log s_b of teacher k's buckets (autograd on that [c, K, k + 1]
tensor alone, log s_b taken as free variables),

    dL_kd/dz_j = (Σ_k g_kj − s_j Σ_k Σ_b h_kb) / T / max(1, Σ mask),
    g_kj = h_ki for j = teacher k's top-k id i,  h_k,tail · s_j / s_tail for j in its tail

from ∂ log s_i / ∂z_j = (δ_ij − s_j) / T and ∂ log s_tail / ∂z_j = ([j in tail] s_j / s_tail − s_j) / T.
For forward KL h_kb = −w_k q_kb, which gives Σ_k w_k (s_j − q̃_kj) / T.

How these targets are stored is the token task's codec (ensemblekd.tasks.token).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ensemblekd.losses import IGNORE, Divergence, KDLoss

# An empty bucket for the weighting rules: probability exactly 0 in float32 at any sane
# temperature, but finite, because entropy_weights computes p · log p and 0 · (−inf) is NaN.
EMPTY_LOGIT = -1e9


def index_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type holding ids 0 .. vocab_size − 1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"vocabulary of {vocab_size} ids does not fit in uint32")


# Below this top-k mass the tail r = 1 - sum(p_topk) is computed directly: float32 cancellation
# costs about 1e-7 absolute, a relative error under 1e-5 for r > 0.01, far below float16's 1e-3.
# Above it (a peaked token) r comes from a logsumexp over the other ids, which keeps r = 1e-6 exact.
DIRECT_TAIL_MASS = 0.99


def topk_targets(logits: torch.Tensor, k: int, chunk_tokens: int = 4096, following: torch.Tensor | None = None):
    """logits [N, V] -> (log p float16 [N, k] descending, ids [N, k], log r float16 [N]), and with
    `following` [N] (the token after each position) a fourth array: log p of that token, float16 [N].

    log_softmax at T = 1 in float32, chunk by chunk. k > V is taken as k = V, whose tail is
    empty: log r = −inf.
    """
    n, v = logits.shape
    k = min(k, v)
    logp, idx = np.empty((n, k), np.float16), np.empty((n, k), index_dtype(v))
    tail = np.full(n, -np.inf, np.float16)
    nxt = None if following is None else np.empty(n, np.float16)
    with torch.no_grad():
        for a in range(0, n, chunk_tokens):
            lp = F.log_softmax(logits[a:a + chunk_tokens].float(), dim=-1)
            val, ix = lp.topk(k, dim=-1)
            part = slice(a, a + len(lp))
            logp[part] = val.half().cpu().numpy()
            idx[part] = ix.cpu().numpy()
            if nxt is not None:
                assert following is not None  # nxt exists only with `following`
                nxt[part] = lp.gather(-1, following[part, None].long().to(lp.device)).squeeze(-1).half().cpu().numpy()
            if k < v:
                tail[part] = _log_tail(lp, val, ix).half().cpu().numpy()
    return (logp, idx, tail) if nxt is None else (logp, idx, tail, nxt)


def _log_tail(lp: torch.Tensor, val: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ top-k p) per row (see DIRECT_TAIL_MASS); overwrites lp's top-k entries."""
    kept = val.exp().sum(-1)
    out = torch.log1p(-kept.clamp(max=1.0))
    peaked = kept > DIRECT_TAIL_MASS
    if peaked.any():
        rows = lp[peaked].scatter_(-1, ix[peaked], -math.inf)
        out[peaked] = rows.logsumexp(-1)
    return out


def next_token_logprobs(logits: torch.Tensor, following: torch.Tensor, chunk_tokens: int = 4096) -> np.ndarray:
    """log p(following token) under softmax(logits) at T = 1: float16 [N], chunk by chunk."""
    return topk_targets(logits, 1, chunk_tokens, following)[3]


def _long(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.int64)) if isinstance(x, np.ndarray) else x.to(torch.int64)


def _float(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x.float()


def _teacher_buckets(logp: torch.Tensor, tail: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """log q over the k + 1 buckets [.., k + 1] (the last one the tail; dropped when k = V)."""
    a = logp / temperature
    k = logp.shape[-1]
    if k < vocab_size:
        log_m = math.log(vocab_size - k)
        a = torch.cat([a, (log_m + (tail - log_m) / temperature).unsqueeze(-1)], dim=-1)
    return a - a.logsumexp(-1, keepdim=True)


def _peaked_rest(log_s: torch.Tensor, idx: torch.Tensor, pairs, size: int):
    """Per (token, teacher) pair: the student's log-probs [size, V] with that teacher's top-k masked
    out, `size` pairs at a time -> (tokens, teachers, rest)."""
    for a in range(0, len(pairs[0]), size):
        rows, teachers = pairs[0][a:a + size], pairs[1][a:a + size]
        yield rows, teachers, log_s[rows].scatter(-1, idx[rows, teachers], -math.inf)


def _chunk_divergence(z, logp, idx, tail, w, vocab_size: int, temperature: float, divergence: Divergence,
                      need_grad: bool):
    """Σ_tokens Σ_k w_k D_k over one chunk (z [c, V], logp and idx [c, K, k], tail and w [c, K])
    and its gradient (module docstring).

    On teacher k's tail the gradient is (h_tail / s_tail) · s, so one [c, V] pass serves every
    teacher's tail and each teacher's own top-k ids get their share back by scatter: O(k) work per
    teacher. Where the top-k hold more than DIRECT_TAIL_MASS of the student's mass, s_tail is tiny
    and that shortcut would cancel large numbers, so those (token, teacher) pairs take the exact
    path: the student's log-probs with the teacher's top-k masked out, c pairs at a time."""
    c, n_teachers, k = idx.shape
    log_s = F.log_softmax(z.float() / temperature, dim=-1)
    log_q = _teacher_buckets(logp, tail, vocab_size, temperature)
    flat_idx = idx.reshape(c, -1)
    log_s_b = log_s.gather(-1, flat_idx).view(c, n_teachers, k)
    if k < vocab_size:
        kept = log_s_b.exp().sum(-1)
        log_s_tail = torch.log1p(-kept.clamp(max=1.0))
        peaked = kept > DIRECT_TAIL_MASS
        pairs = peaked.nonzero(as_tuple=True)
        for rows, teachers, rest in _peaked_rest(log_s, idx, pairs, c):
            log_s_tail[rows, teachers] = rest.logsumexp(-1)
        log_s_b = torch.cat([log_s_b, log_s_tail.unsqueeze(-1)], dim=-1)              # [c, K, k + 1]
    leaf = log_s_b.detach().requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        total = (w * divergence(log_q, leaf)).sum()
    if not need_grad:
        return total, None
    h, = torch.autograd.grad(total, leaf)
    s = log_s.exp()
    grad = -h.sum((1, 2)).unsqueeze(-1) * s
    grad.scatter_add_(-1, flat_idx, h[..., :k].reshape(c, -1))
    if k < vocab_size:
        h_tail = h[..., k]
        share = torch.where(peaked, 0.0, h_tail * (-log_s_tail).exp())                   # h_tail / s_tail
        grad += share.sum(-1, keepdim=True) * s
        grad.scatter_add_(-1, flat_idx, (-share.unsqueeze(-1) * log_s_b[..., :k].exp()).reshape(c, -1))
        for rows, teachers, rest in _peaked_rest(log_s, idx, pairs, c):
            grad.index_add_(0, rows, h_tail[rows, teachers, None] * (rest - log_s_tail[rows, teachers, None]).exp())
    return total.detach(), grad / temperature


class _SparseDivergence(torch.autograd.Function):
    """The forward writes each chunk's gradient into one [N, V] buffer that the backward hands on:
    nothing of size N · V is kept but that gradient, and nothing is recomputed."""

    @staticmethod
    def forward(ctx, z, logp, idx, tail, w, mask, vocab_size, temperature, chunk_tokens, divergence):
        grad = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        count = len(z) if mask is None else int(mask.sum())
        total = torch.zeros((), device=z.device)
        for a in range(0, len(z), chunk_tokens):
            rows = slice(a, a + chunk_tokens)
            if mask is not None:  # masked rows are never read: padding may hold anything, NaN too
                rows = a + mask[rows].nonzero().squeeze(-1)
                if len(rows) == 0:
                    continue
            loss, g = _chunk_divergence(z[rows], logp[rows], idx[rows], tail[rows], w[rows], vocab_size, temperature,
                                        divergence, grad is not None)
            total += loss
            if grad is not None:
                grad[rows] = (g / max(1, count)).to(grad.dtype)
        ctx.grad = grad
        return total / max(1, count)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        if ctx.grad is None:
            raise RuntimeError("sparse_divergence: a second backward through the same graph is not supported")
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(g.to(grad.dtype)), None, None, None, None, None, None, None, None, None


def sparse_divergence(student_logits: torch.Tensor, logp, idx, tail, vocab_size: int, temperature: float,
                      weights: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      chunk_tokens: int = 1024, divergence: Divergence = Divergence("forward_kl")) -> torch.Tensor:
    """The KD term above (a scalar, not × T²). student_logits [N, V]; logp, idx [N, K, k]; tail,
    weights [N, K] (None: 1/K); mask [N] bool (None: all). Tensors or numpy arrays.

    Chunked over tokens with the gradient computed alongside (as fused cross-entropy kernels do):
    memory is the [N, V] gradient plus O(chunk_tokens · V) scratch, for any N and K.
    """
    dev = student_logits.device
    logp, idx, tail = _float(logp).to(dev), _long(idx).to(dev), _float(tail).to(dev)
    w = torch.full(tail.shape, 1.0 / tail.shape[1], device=dev) if weights is None else weights.float().to(dev)
    mask = None if mask is None else mask.to(dev, torch.bool)
    return _SparseDivergence.apply(student_logits, logp, idx, tail, w, mask, vocab_size, temperature, chunk_tokens,
                                   divergence)


def token_loss(student_logits: torch.Tensor, labels: torch.Tensor, logp, idx, tail, vocab_size: int,
               temperature: float, alpha: float, weights: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, divergence: Divergence = Divergence("forward_kl"),
               kd_term: Callable[[torch.Tensor], torch.Tensor] | None = None) -> KDLoss:
    """alpha · CE(labels, student at T = 1) + (1 − alpha) · T² · sparse_divergence, as losses.kd_loss.

    CE averages over the unmasked tokens with a label (labels == IGNORE: none); 0 if there are none.
    kd_term: the KD term as a function of the student's logits, in place of sparse_divergence over
    logp, idx, tail (teachers with tokenizers of their own: crosstok.mixed_divergence).
    """
    if kd_term is None:
        def kd_term(z: torch.Tensor) -> torch.Tensor:
            return sparse_divergence(z, logp, idx, tail, vocab_size, temperature, weights, mask, divergence=divergence)
    if alpha >= 1.0:  # labels alone (a baseline): the KD term is only reported, so no gradient is computed
        with torch.no_grad():
            kd = kd_term(student_logits.detach())
    else:
        kd = kd_term(student_logits)
    keep = labels != IGNORE if mask is None else (labels != IGNORE) & mask
    if keep.any():
        ce = F.cross_entropy(student_logits[keep].float(), labels[keep])
    else:
        ce = student_logits[:0].float().sum()
    return KDLoss(alpha * ce + (1.0 - alpha) * temperature**2 * kd, ce, kd)


def rule_inputs(logp, idx, tail, labels: torch.Tensor, vocab_size: int | Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse targets as inputs for the weighting rules, which take logits [B, K, C] and labels [B].

    -> (bucket logits [N, K, k + 2] float32, bucket labels [N]). Bucket 0: the teacher's log p of
    the true label (its top-k value, else the even-tail estimate log(r / (V − k))); 1..k: the
    top-k log-probs, the label's own entry emptied; k + 1: the rest of the tail. log_softmax over
    the buckets is each teacher's exact distribution at T = 1 with the label alone in bucket 0,
    whose label is 0 (IGNORE stays IGNORE, with bucket 0 empty). Entropy then is that of the
    buckets (the tail one outcome): a lower bound of the full entropy. An empty bucket holds
    EMPTY_LOGIT, not −inf (see there); so does a label whose probability underflowed to 0.
    Teachers with vocabularies of their own (crosstok): labels [N, K], each teacher's own next token
    at the position (IGNORE where it has none), and vocab_size one per teacher; a position's bucket
    label is 0 when any teacher has one.
    """
    lp, ix, tl = _float(logp), _long(idx), _float(tail)
    sizes = torch.as_tensor(vocab_size, dtype=torch.float64).expand(lp.shape[1])
    m = sizes - lp.shape[-1]                                         # ids in each teacher's tail
    log_m = torch.where(m > 0, m.clamp_min(1).log(), math.inf).float()
    log_rest = torch.where(m > 1, torch.log1p(-1.0 / m.clamp_min(2)), -math.inf).float()   # log(1 − 1/m)
    labels = labels.to(ix.device).long()
    own = labels.view(-1, 1) if labels.dim() == 1 else labels        # [N, 1] or [N, K]
    hit = ix == own.unsqueeze(-1)                                    # IGNORE (< 0) never hits
    in_top = hit.any(-1)
    from_tail = (own != IGNORE) & ~in_top                            # never when m = 0
    b0 = torch.where(in_top, torch.where(hit, lp, -math.inf).amax(-1),
                     torch.where(from_tail, tl - log_m, -math.inf))
    b_tail = torch.where(from_tail, tl + log_rest, tl)
    buckets = torch.cat([b0.unsqueeze(-1), torch.where(hit, -math.inf, lp), b_tail.unsqueeze(-1)], dim=-1)
    buckets = torch.nan_to_num(buckets, nan=EMPTY_LOGIT).clamp_min(EMPTY_LOGIT)
    labelled = labels != IGNORE if labels.dim() == 1 else (labels != IGNORE).any(-1)
    return buckets, torch.where(labelled, 0, IGNORE).long()


def dense_from_topk(logp, idx, tail, vocab_size: int) -> torch.Tensor:
    """Probabilities [N, V]: the top-k in place, the tail mass spread evenly over the other ids."""
    lp, ix, tl = _float(logp), _long(idx), _float(tail)
    k = lp.shape[-1]
    fill = tl.exp() / (vocab_size - k) if k < vocab_size else torch.zeros_like(tl)
    dense = fill.unsqueeze(-1).expand(lp.shape[0], vocab_size).clone()
    return dense.scatter_(-1, ix, lp.exp())
