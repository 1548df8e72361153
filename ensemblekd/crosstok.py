"""Soft targets across tokenizers: teachers whose vocabularies differ from the student's.

Each teacher stores, per position of ITS OWN tokenization of a document (ensemblekd.topk): its
top-k log-probs over its own vocabulary, logp and idx [N, k], the log of the mass outside them,
log r [N], the log-prob of the token that followed, nxt [N], and the byte end of each of its
tokens in the document (byte_ends). At training time, from these arrays alone:

1. Positions. Position i of a tokenization predicts token i + 1 having read bytes [0, ends[i]).
   A student and a teacher position are compared only where both have read exactly the same bytes
   (aligned_positions).
2. Vocabularies. A teacher id maps to the student id whose token is the same string of bytes, or
   to −1 (vocab_map).
3. Losses, per aligned position, student logits z [N, Vs] at those positions, at temperature T:

       a_i    = log p_i / T                                    the teacher's top-k, i = 1 .. k
       a_tail = log(Vt − k) + (log r − log(Vt − k)) / T         its tail, spread evenly (as in topk)
       q_i    = exp(a_i − logsumexp(a, a_tail)),  q_tail likewise      (sum to 1)
       s      = softmax(z / T) over the student's vocabulary

   mapped_kl: over the student ids the teacher's mapped top-k ids map to (each once: teacher ids
   with the same bytes add up) and one rest bucket,
       q_j    = Σ_{i: map(i) = j} q_i,   q_rest = q_tail + Σ_{i unmapped} q_i = 1 − Σ_j q_j
       s_j,                              s_rest = 1 − Σ_j s_j
       KL     = Σ_j q_j (log q_j − log s_j) + q_rest (log q_rest − log s_rest)
   With identical vocabularies it is topk.sparse_divergence's forward KL (K = 1) exactly.

   uld (Universal Logit Distillation, Boizard et al. 2024) over what mapped_kl leaves out:
       ULD    = Σ_r |u_(r) − v_(r)|,  r = 1 .. k
   u: the teacher's unmapped top-k q_i sorted descending (m of them, m ≤ k); v: the student's m
   largest s_j over ids outside the mapped set, sorted descending; both zero-padded to k.

   hybrid_loss: mean over positions of w · (KL + β · ULD) (GOLD's hybrid), to be multiplied by T²
   by the caller as topk's loss is.

A teacher's quality, free of its tokenizer: bits_per_byte(Σ −nxt, bytes covered).

Where each step approximates is listed in docs/cross-tokenizer.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from ensemblekd.errors import UserError
from ensemblekd.losses import Divergence
from ensemblekd.topk import DIRECT_TAIL_MASS, _float, _long, sparse_divergence

# --------------------------------------------------------------------------------------------------
# Byte offsets and aligned positions
# --------------------------------------------------------------------------------------------------


def _utf8_lengths(text: str) -> np.ndarray:
    """The UTF-8 length of each character of text, int64 [len(text)]."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)


def byte_ends(text: str, offsets) -> np.ndarray:
    """The UTF-8 byte end of each token of text, int64 [n], non-decreasing, from a fast tokenizer's
    character offsets (`tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)`'s
    offset_mapping: one (start, end) per token, end exclusive).

    A token ending inside a character (a byte-level BPE splits one multi-byte character, e.g. an
    emoji, over several tokens, each reported with the whole character's span) gets the end of the
    token before it (0 for the first token): no returned end lies inside a character, and
    boundaries(ends) marks exactly the tokens after which a prefix of whole characters has been read.
    A token is taken to end inside a character when the next token starts before its end.

    The spans must cover the text in order: the first starts at 0 (or after whitespace), each next
    one starts where the previous ended, or one character earlier when that character is
    multi-byte (the split case above), or after a gap of whitespace only (tokenizers that trim
    offsets, as RoBERTa's, leave a token's leading space out of its span: the gap belongs to the
    next token, so the ends stay exact); the last ends at the end of the text, or before trailing
    whitespace. Anything else (a span past the text, a normaliser that dropped other characters,
    spans out of order, the spans of some other text) is a UserError, as are missing offsets (a
    slow tokenizer has none). Special tokens are not part of the text: tokenize without them.
    """
    if offsets is None:
        raise UserError("the tokenizer gave no character offsets: load a fast tokenizer (use_fast=True) "
                        "and call it with return_offsets_mapping=True")
    try:
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise UserError(f"the tokenizer's offsets are not (start, end) pairs: {str(offsets)[:80]}") from None
    n = len(off)
    lengths = _utf8_lengths(text)
    cum = np.concatenate([[0], np.cumsum(lengths)])
    if n == 0:
        if text.strip():
            raise UserError(f"the tokenizer's spans do not cover the document: no tokens for {len(text)} characters")
        return np.zeros(0, np.int64)
    starts, ends = off[:, 0], off[:, 1]
    prev_end = np.concatenate([[0], ends[:-1]])
    bad = (starts < 0) | (ends > len(text)) | (ends < starts)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"the tokenizer's spans do not cover the document: token {i} spans characters "
                        f"{int(starts[i])}..{int(ends[i])} of a {len(text)}-character text")
    split = (starts == prev_end - 1) & (ends >= prev_end)
    split[split] = lengths[starts[split]] > 1
    gap = starts > prev_end
    if gap.any():                                                    # allowed when it holds whitespace only
        nonspace = np.concatenate([[0], np.cumsum([not c.isspace() for c in text])])   # non-space before each index
        gap[gap] = nonspace[starts[gap]] == nonspace[prev_end[gap]]
    ok = (starts == prev_end) | split | gap
    if not ok.all():
        i = int(np.argmax(~ok))
        before = f"the previous one ends at {int(prev_end[i])}" if i else "the text starts at 0"
        raise UserError(f"the tokenizer's spans do not cover the document: token {i} starts at character "
                        f"{int(starts[i])} ({text[starts[i]:starts[i] + 10]!r}), {before}; a tokenizer that "
                        "normalises the text (drops or changes characters) cannot be aligned by bytes")
    if ends[-1] < len(text) and not text[ends[-1]:].isspace():
        raise UserError(f"the tokenizer's spans do not cover the document: the last token ends at character "
                        f"{int(ends[-1])} of {len(text)} ({text[ends[-1]:ends[-1] + 10]!r} left)")
    inside = np.zeros(n, bool)
    inside[:-1] = split[1:]
    return np.maximum.accumulate(np.where(inside, 0, cum[ends]))


def boundaries(ends) -> np.ndarray:
    """bool [n]: True where position i has read a new prefix of whole characters, ends[i] > ends[i − 1]
    (ends[−1] = 0): False for a token ending inside a character (byte_ends gives it the previous
    end), a token of no text, and a first token reading 0 bytes (a BOS)."""
    e = np.asarray(ends, dtype=np.int64)
    return e > np.concatenate([[0], e[:-1]])


def aligned_positions(student_ends, teacher_ends) -> tuple[np.ndarray, np.ndarray]:
    """-> (s_pos, t_pos) int64 [M], ascending: the positions (indices into each tokenization's
    next-token predictions) at which student and teacher have read exactly the same bytes,
    student_ends[s] == teacher_ends[t], both real boundaries (boundaries()) and both followed by a
    token (not the last position). O(n log n).

    At each pair both predict a token starting at the same byte; whether they predict the same
    span of bytes is a separate question (student_ends[s + 1] == teacher_ends[t + 1])."""
    se, te = np.asarray(student_ends, dtype=np.int64), np.asarray(teacher_ends, dtype=np.int64)
    s_ok, t_ok = boundaries(se), boundaries(te)
    s_ok[-1:] = False
    t_ok[-1:] = False
    s_idx, t_idx = np.flatnonzero(s_ok), np.flatnonzero(t_ok)
    _, a, b = np.intersect1d(se[s_idx], te[t_idx], assume_unique=True, return_indices=True)
    return s_idx[a].astype(np.int64), t_idx[b].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_steps(tree) -> list[dict]:
    """The decoder's JSON, Sequence flattened, in order."""
    if not tree:
        return []
    if tree.get("type") == "Sequence":
        return [step for sub in tree.get("decoders", []) for step in _decoder_steps(sub)]
    return [tree]


def _token_bytes(tokenizer) -> tuple[list[bytes | None], np.ndarray]:
    """(token_bytes' list, bool [V]: the ids that are byte-fallback tokens such as <0x0A>)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)     # a transformers wrapper or a tokenizers.Tokenizer
    steps = _decoder_steps(json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None)
    types = {s.get("type") for s in steps}
    replaces = [((s.get("pattern") or {}).get("String"), s.get("content", "")) for s in steps if s.get("type") == "Replace"]
    replaces += [(s.get("replacement", "▁"), " ") for s in steps if s.get("type") == "Metaspace"]
    byte_level = "ByteLevel" in types
    if not byte_level and not replaces:
        raise UserError(f"cannot tell the bytes of this tokenizer's tokens (decoder {sorted(t for t in types if t)} "
                        "): byte-level BPE and SentencePiece-style (▁) vocabularies are supported")
    fallback = "ByteFallback" in types
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    size = 1 + max([*vocab.values(), *added.keys(), -1])
    out: list[bytes | None] = [None] * size
    is_fallback = np.zeros(size, bool)
    for tok, i in vocab.items():
        if byte_level:
            try:
                out[i] = bytes([_BYTE_DECODER[c] for c in tok])
            except KeyError:                                     # not a byte-level string: no bytes
                out[i] = None
            continue
        if fallback and len(tok) == 6:
            m = _BYTE_FALLBACK.fullmatch(tok)
            if m:
                out[i], is_fallback[i] = bytes([int(m.group(1), 16)]), True
                continue
        for pattern, content in replaces:
            if pattern:
                tok = tok.replace(pattern, content)
        out[i] = tok.encode("utf-8")
    for i, at in added.items():                                  # matched on the raw text, before the model
        out[i] = None if at.special else at.content.encode("utf-8")
        is_fallback[i] = False
    for i in getattr(tokenizer, "all_special_ids", []):
        if 0 <= i < size:
            out[i] = None
    return out, is_fallback


def token_bytes(tokenizer) -> list[bytes | None]:
    """The string of bytes each id of a fast tokenizer stands for in the text, indexed by id; None
    for special tokens (added tokens marked special, and all_special_ids) and ids of no bytes.

    Byte-level BPE (a ByteLevel decoder, GPT-2 / SmolLM2 / Llama 3): each character of the token maps
    back through GPT-2's bytes_to_unicode table ("Ġ" is a space). SentencePiece-style (a Metaspace
    decoder, or Replace decoders as Gemma's "▁" -> " "): the replacements applied, then UTF-8; with
    a ByteFallback decoder a token "<0xNN>" is that single byte. Non-special added tokens are their
    content's UTF-8 (they are matched on the raw text). Other decoders (WordPiece's "##", none) are a
    UserError. A SentencePiece tokenizer that prepends "▁" to the text gives its first token one byte
    more than the text holds: the map is per token and ignores it.
    """
    return _token_bytes(tokenizer)[0]


def vocab_map(student_tokenizer, teacher_tokenizer, teacher_vocab_size: int | None = None) -> np.ndarray:
    """int64 [Vt]: for each teacher id the student id whose token is the same string of bytes
    (token_bytes), else −1; special tokens map to −1 and nothing maps to them. Vt is the teacher
    tokenizer's size, or teacher_vocab_size (its logits' width, when its embedding is padded past
    the tokenizer's ids; the ids beyond map to −1).

    Several student ids with the same bytes: a byte-fallback token (<0xNN>) gives way to an ordinary
    token of that byte (the tokenizer emits <0xNN> only for bytes it has no token for); if ordinary
    tokens still tie, the bytes are ambiguous and map to −1 (the teacher's mass on them goes to the
    rest bucket, never to a guess). Several teacher ids may map to one student id; the losses add
    their masses. Dict look-ups: about a second for a 262k vocabulary.
    """
    s_bytes, s_fallback = _token_bytes(student_tokenizer)
    t_bytes = token_bytes(teacher_tokenizer)
    lookup: dict[bytes, int] = {}
    for j, b in enumerate(s_bytes):
        if b is None:
            continue
        old = lookup.get(b)
        if old is None:
            lookup[b] = j
        elif old >= 0 and s_fallback[old] != s_fallback[j]:
            lookup[b] = old if s_fallback[j] else j
        elif old >= 0 and not s_fallback[j]:
            lookup[b] = -1                                           # two ordinary tokens of the same bytes
    size = len(t_bytes) if teacher_vocab_size is None else teacher_vocab_size
    if size < len(t_bytes):
        raise ValueError(f"teacher_vocab_size {size} is smaller than the teacher tokenizer's {len(t_bytes)} ids")
    out = np.full(size, -1, np.int64)
    out[:len(t_bytes)] = [-1 if b is None else lookup.get(b, -1) for b in t_bytes]
    return out


# --------------------------------------------------------------------------------------------------
# Losses over aligned positions
# --------------------------------------------------------------------------------------------------


def _as(x, dtype: torch.dtype, device) -> torch.Tensor:
    """_float, kept in float64 when the student's logits are."""
    if dtype == torch.float64:
        return (torch.from_numpy(np.asarray(x, dtype=np.float64)) if isinstance(x, np.ndarray) else x.double()).to(device)
    return _float(x).to(device)


def _parts(student_logits: torch.Tensor, logp, idx, tail, mapping, temperature: float):
    """What both losses need, in float32 (float64 logits stay float64).

    -> log_s [N, Vs], sid [N, k] (the student id of each top-k slot, −1 unmapped), lead [N, k] (the
    first slot of each mapped student id), log_q [N, k] (each teacher slot's tempered log-prob, over
    its full vocabulary), log_q_lead [N, k] (a lead slot's summed mass over its duplicates; −inf
    elsewhere), log_q_rest [N]."""
    z = student_logits
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    dev = z.device
    lp, tl = _as(logp, dtype, dev), _as(tail, dtype, dev)
    ix, mp = _long(idx).to(dev), _long(mapping).to(dev)
    vt, k = len(mp), lp.shape[-1]
    log_s = torch.log_softmax(z.to(dtype) / temperature, dim=-1)
    a = lp / temperature
    if k < vt:
        log_m = math.log(vt - k)
        a = torch.cat([a, (log_m + (tl - log_m) / temperature).unsqueeze(-1)], dim=-1)
    log_q_all = a - a.logsumexp(-1, keepdim=True)
    log_q, log_q_tail = log_q_all[:, :k], log_q_all[:, k:]              # log_q_tail [N, 0 or 1]
    sid = mp[ix]
    mapped = sid >= 0
    same = (sid.unsqueeze(-1) == sid.unsqueeze(-2)) & mapped.unsqueeze(-1) & mapped.unsqueeze(-2)   # [N, k, k]
    lead = mapped & ~(same & torch.ones(k, k, dtype=torch.bool, device=dev).tril(-1)).any(-1)
    log_q_lead = torch.where(same, log_q.unsqueeze(-2), -math.inf).logsumexp(-1)
    log_q_lead = torch.where(lead, log_q_lead, -math.inf)
    log_q_rest = torch.cat([torch.where(mapped, -math.inf, log_q), log_q_tail], dim=-1).logsumexp(-1)
    return log_s, sid, lead, log_q, log_q_lead, log_q_rest


def _student_rest(log_s: torch.Tensor, sid: torch.Tensor, lead: torch.Tensor):
    """log s_j of the lead slots [N, k] (−inf elsewhere) and log(1 − Σ_j s_j) [N]: directly, or where
    the mapped ids hold more than DIRECT_TAIL_MASS of the student's mass, as a logsumexp over the
    other ids (as topk does for its tail)."""
    log_s_b = torch.where(lead, log_s.gather(-1, sid.clamp(min=0)), -math.inf)
    kept = log_s_b.exp().sum(-1)
    peaked = kept > DIRECT_TAIL_MASS
    rest = torch.log1p(-torch.where(peaked, 0.0, kept))
    if peaked.any():
        rows = peaked.nonzero().squeeze(-1)
        r_sid, r_lead = sid[rows], lead[rows]
        first = r_sid.gather(-1, r_lead.int().argmax(-1, keepdim=True))      # every peaked row has a mapped id
        hide = torch.zeros(len(rows), log_s.shape[-1], dtype=torch.bool, device=log_s.device)
        hide.scatter_(-1, torch.where(r_lead, r_sid, first), True)
        empty = hide.all(-1)                                                  # every student id is mapped
        exact = torch.full((len(rows),), -math.inf, dtype=log_s.dtype, device=log_s.device)
        if (~empty).any():
            exact = exact.index_put(((~empty).nonzero().squeeze(-1),),
                                    log_s[rows[~empty]].masked_fill(hide[~empty], -math.inf).logsumexp(-1))
        rest = rest.index_put((rows,), exact)
    return log_s_b, rest


def _xlogy_diff(log_q: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """q (log q − log s), 0 where q = 0 (whatever s)."""
    q = log_q.exp()
    live = q > 0
    return torch.where(live, q * (torch.where(live, log_q, 0.0) - torch.where(live, log_s, 0.0)), 0.0)


def _mapped_kl(log_s, sid, lead, log_q_lead, log_q_rest):
    log_s_b, log_s_rest = _student_rest(log_s, sid, lead)
    return _xlogy_diff(log_q_lead, log_s_b).sum(-1) + _xlogy_diff(log_q_rest, log_s_rest)


def _uld(log_s, sid, lead, log_q):
    mapped = sid >= 0
    k = sid.shape[-1]
    u = torch.where(mapped, 0.0, log_q.exp()).sort(-1, descending=True).values
    m = (~mapped).sum(-1, keepdim=True)
    top_val, top_ix = log_s.topk(min(2 * k, log_s.shape[-1]), dim=-1)        # at most k of them are mapped
    taken = ((top_ix.unsqueeze(-1) == sid.unsqueeze(-2)) & lead.unsqueeze(-2)).any(-1)
    cand = torch.where(taken, -math.inf, top_val)
    v = cand.topk(min(k, cand.shape[-1]), dim=-1).values.exp()
    v = torch.where(torch.arange(v.shape[-1], device=v.device) < m, v, 0.0)
    if v.shape[-1] < k:
        v = torch.cat([v, v.new_zeros(len(v), k - v.shape[-1])], dim=-1)
    return (u - v).abs().sum(-1)


def mapped_kl(student_logits: torch.Tensor, logp, idx, tail, mapping, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL [N] per aligned position over the common support (module docstring): the student
    ids that the teacher's mapped top-k ids map to, plus one rest bucket on each side (the
    teacher's: its tail and its unmapped top-k; the student's: all its other ids).

    student_logits [N, Vs] at the aligned positions; logp, idx [N, k] and tail [N] one teacher's
    stored targets there; mapping [Vt] (vocab_map: teacher id -> student id or −1; its length is
    the teacher's vocabulary size, used for the tail's temperature as in topk). Tensors or numpy
    arrays; differentiable in student_logits (float64 logits are kept in float64). Exact (as topk's
    loss is) when the two tokenizers segment the bytes that follow the same way; with identical
    vocabularies and mapping = arange(V) it equals topk.sparse_divergence with K = 1.
    """
    log_s, sid, lead, _, log_q_lead, log_q_rest = _parts(student_logits, logp, idx, tail, mapping, temperature)
    return _mapped_kl(log_s, sid, lead, log_q_lead, log_q_rest)


def uld(student_logits: torch.Tensor, logp, idx, tail, mapping, temperature: float = 1.0) -> torch.Tensor:
    """Universal Logit Distillation [N] per aligned position, on what mapped_kl leaves out: the L1
    distance between the teacher's unmapped top-k probabilities q_i (tempered, over its full
    vocabulary, as in mapped_kl) sorted descending and the student's as many largest s_j = softmax(z / T)_j
    over ids outside the mapped set, sorted descending; zero-padded to k (the student side too when
    its vocabulary has fewer ids left). Arguments as mapped_kl.

    It is free of vocabulary order: it compares the shapes of the two distributions, not which token
    gets which mass, so it is an approximation (0 for a student that puts the right masses on the
    wrong tokens); it sees only the teacher's top-k (the tail is not stored) and the student's top m.
    """
    log_s, sid, lead, log_q, _, _ = _parts(student_logits, logp, idx, tail, mapping, temperature)
    return _uld(log_s, sid, lead, log_q)


def hybrid_loss(student_logits: torch.Tensor, logp, idx, tail, mapping, temperature: float = 1.0,
                beta: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_n w_n (mapped_kl_n + beta · uld_n) / max(1, N): a scalar, not × T² (GOLD's hybrid). weights
    [N] per position (None: 1); arguments otherwise as mapped_kl.

    One teacher per call, [N, k], not topk's [N, K, k]: teachers with other tokenizers align with the
    student at different positions and map through different vocabularies, so their targets never
    share one [N, K, k] array. Several teachers: Σ_t hybrid_loss(z[s_pos_t], targets_t[t_pos_t], ...,
    weights=w_t), with w_t the teacher's weight at each of its positions; where teachers do share
    positions and their weights sum to 1 there, this is the mean over positions of Σ_t w_t L_t.
    """
    log_s, sid, lead, log_q, log_q_lead, log_q_rest = _parts(student_logits, logp, idx, tail, mapping, temperature)
    per = _mapped_kl(log_s, sid, lead, log_q_lead, log_q_rest)
    if beta:
        per = per + beta * _uld(log_s, sid, lead, log_q)
    if weights is not None:
        per = per * weights.to(per.device, per.dtype)
    return per.sum() / max(1, len(per))


def mixed_divergence(student_logits: torch.Tensor, logp, idx, tail, weights: torch.Tensor, present: torch.Tensor,
                     maps: Sequence[torch.Tensor | None], vocab_size: int, temperature: float,
                     divergence: Divergence = Divergence("forward_kl"), beta: float = 1.0) -> torch.Tensor:
    """The KD term of a batch whose teachers may have tokenizers of their own: Σ_n Σ_t w_nt D_nt / N
    (a scalar, not × T²), student_logits [N, V] at the batch's positions, logp, idx [N, K, k], tail,
    weights and present [N, K] (present: the teacher is aligned with the position; weights already 0
    where it is not), maps[t]: None for a teacher of the student's vocabulary (D:
    topk.sparse_divergence with the configured divergence, all of them in one pass), else its
    vocabulary map as a tensor (D: hybrid_loss, mapped KL + beta · ULD, at its aligned positions)."""
    n = len(student_logits)
    same = [t for t, m in enumerate(maps) if m is None]
    total = student_logits.new_zeros((), dtype=torch.float32)
    if same:
        total = total + sparse_divergence(student_logits, logp[:, same], idx[:, same], tail[:, same], vocab_size,
                                          temperature, weights[:, same], divergence=divergence)
    for t, mapping in enumerate(maps):
        rows = present[:, t]
        if mapping is None or not bool(rows.any()):
            continue
        part = hybrid_loss(student_logits[rows], logp[rows, t], idx[rows, t], tail[rows, t], mapping, temperature,
                           beta, weights[rows, t])
        total = total + part * (int(rows.sum()) / max(1, n))
    return total


# --------------------------------------------------------------------------------------------------
# Tokenizer-free quality
# --------------------------------------------------------------------------------------------------


def bits_per_byte(nll_nats_sum: float, n_bytes: int) -> float:
    """Total negative log-likelihood of a run of tokens, in nats, over the UTF-8 bytes of text they
    cover, in bits: nll / ln 2 / n_bytes. Comparable across tokenizers (unlike per-token loss or
    perplexity): for a stored teacher nll = −Σ nxt over its positions, n_bytes = the bytes those
    next tokens cover."""
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive number of bytes, not {n_bytes}")
    return float(nll_nats_sum) / math.log(2) / n_bytes


def bits_per_char(nll_nats_sum: float, n_chars: int) -> float:
    """As bits_per_byte, per character (Unicode code point) of the text covered."""
    if n_chars <= 0:
        raise ValueError(f"bits_per_char needs a positive number of characters, not {n_chars}")
    return float(nll_nats_sum) / math.log(2) / n_chars
