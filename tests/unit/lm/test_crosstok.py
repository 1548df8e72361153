"""ensemblekd.crosstok: byte offsets, aligned positions, the vocabulary map and the cross-tokenizer
losses, on two tiny tokenizers built here (a GPT-2-style byte-level BPE and a Gemma-style "▁" BPE
with byte fallback) against brute-force and hand-computed references. No downloads."""

import math

import numpy as np
import pytest
import torch

from ensemblekd import crosstok as ct
from ensemblekd.errors import UserError
from ensemblekd.topk import sparse_divergence, topk_targets
from tiny_tokenizers import TEXTS, byte_level_tokenizer, metaspace_tokenizer, fast_tokenizer

@pytest.fixture(scope="module")
def toks():
    return {"byte_level": fast_tokenizer(byte_level_tokenizer()), "metaspace": fast_tokenizer(metaspace_tokenizer())}


def _encode(tok, text):
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return enc["input_ids"], enc["offset_mapping"]


# ---------------------------------------------------------------------------------------------- offsets


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
@pytest.mark.parametrize("text", TEXTS)
def test_byte_ends_match_the_tokens_own_bytes(toks, name, text):
    """Reference from the vocabulary alone: the bytes of tokens 0..i add up to the true end of token
    i; where that falls inside a character the expected end is the previous one. The prefix decoded
    from tokens 0..i is the text up to each boundary."""
    tok = toks[name]
    ids, offsets = _encode(tok, text)
    ends = ct.byte_ends(text, offsets)
    pieces = ct.token_bytes(tok)
    assert b"".join(pieces[i] for i in ids) == text.encode()           # lossless, and token_bytes right
    char_ends = set(np.cumsum([0] + [len(c.encode()) for c in text]).tolist())
    true, expected = 0, []
    for i in ids:
        true += len(pieces[i])
        expected.append(true if true in char_ends else (expected[-1] if expected else 0))
    assert ends.dtype == np.int64 and ends.tolist() == expected
    assert (np.diff(ends) >= 0).all()
    b = ct.boundaries(ends)
    assert set(ends[b].tolist()) == {e for e in np.cumsum([len(pieces[i]) for i in ids]).tolist() if e in char_ends}
    for i in np.flatnonzero(b):
        assert tok.decode(ids[:i + 1]) == text.encode()[:ends[i]].decode()


def test_a_character_split_over_tokens_has_no_boundary_inside(toks):
    text = "vu 🎉 ok"                                         # the emoji: characters 3, bytes 3..7
    ids, offsets = _encode(toks["byte_level"], text)
    assert sum(1 for o in offsets if tuple(o) == (3, 4)) > 1   # the emoji is split over several tokens
    ends = ct.byte_ends(text, offsets)
    pieces = [toks["byte_level"].convert_ids_to_tokens(i) for i in ids]
    assert pieces[:3] == ["v", "u", "Ġ"] and ends[:3].tolist() == [1, 2, 3]
    inside = [i for i, o in enumerate(offsets) if tuple(o) == (3, 4)][:-1]
    assert ends[inside].tolist() == [3] * len(inside) and not ct.boundaries(ends)[inside].any()
    assert ends[inside[-1] + 1] == 7 and ct.boundaries(ends)[inside[-1] + 1]
    # a hand-made chain as SmolLM2 gives it: "ĠðŁ" spans the space and half the emoji
    assert ct.byte_ends("u 🎉!", [(0, 1), (1, 3), (2, 3), (2, 3), (3, 4)]).tolist() == [1, 1, 1, 6, 7]
    assert ct.boundaries([1, 1, 1, 6, 7]).tolist() == [True, False, False, True, True]
    assert ct.byte_ends("🎉", [(0, 1), (0, 1)]).tolist() == [0, 4]     # a first token inside: 0, not a boundary
    assert ct.boundaries([0, 4]).tolist() == [False, True]


def test_trimmed_offsets_leave_gaps_of_whitespace_and_no_false_boundary():
    """RoBERTa-style trim_offsets leaves whitespace out of spans: a token's leading space (the gap
    belongs to it: same end), or all of a whitespace-only token (an empty span, which then marks no
    boundary: one lost, none false)."""
    from tokenizers import processors

    plain, trimmed = byte_level_tokenizer(), byte_level_tokenizer()
    trimmed.post_processor = processors.ByteLevel(trim_offsets=True)
    lost = 0
    for text in TEXTS:
        ids, a = _encode(fast_tokenizer(plain), text)
        b = _encode(fast_tokenizer(trimmed), text)[1]
        if "  " in text:
            assert a != b
        ea, eb = ct.byte_ends(text, a), ct.byte_ends(text, b)
        ba, bb = ct.boundaries(ea), ct.boundaries(eb)
        assert (ea[bb] == eb[bb]).all() and not (bb & ~ba).any()
        for i in np.flatnonzero(ba & ~bb):
            assert text[a[i][0]:a[i][1]].isspace() and b[i][0] == b[i][1]
            lost += 1
    assert lost > 0
    assert ct.byte_ends("a b ", [(0, 1), (2, 3)]).tolist() == [1, 3]        # trailing whitespace may be left out


def test_bad_offsets_are_one_line_user_errors(toks):
    from tokenizers import normalizers

    with pytest.raises(UserError, match="no character offsets"):
        ct.byte_ends("abc", None)
    text = "Un café! très naïve!"
    dropping = metaspace_tokenizer()                                  # a normaliser that drops "!": its spans skip them
    dropping.normalizer = normalizers.Sequence([normalizers.Replace("!", ""), normalizers.Replace(" ", "▁")])
    with pytest.raises(UserError, match="spans do not cover the document: token .* starts at character 8"):
        ct.byte_ends(text, _encode(fast_tokenizer(dropping), text)[1])
    offsets = _encode(toks["metaspace"], text)[1]
    with pytest.raises(UserError, match="the last token ends at character"):
        ct.byte_ends(text + " and more", offsets)            # the spans of a shorter text
    with pytest.raises(UserError, match="spans do not cover the document"):
        ct.byte_ends(text[1:], offsets)                      # past the end
    bad = [(0, 1), (1, 2), (1, 2), (2, 3)]                   # an ASCII character "split" over tokens
    with pytest.raises(UserError, match="token 2 starts at character 1"):
        ct.byte_ends("abc", bad)
    with pytest.raises(UserError, match="token 1 starts at character 0"):
        ct.byte_ends("abc", [(0, 2), (0, 1), (2, 3)])        # out of order
    with pytest.raises(UserError, match="token 0 starts at character 1"):
        ct.byte_ends("abc", [(1, 3)])
    with pytest.raises(UserError, match="no tokens"):
        ct.byte_ends("abc", [])
    assert ct.byte_ends("", []).tolist() == []
    with pytest.raises(UserError, match="not \\(start, end\\) pairs"):
        ct.byte_ends("abc", [(0, None)])


# ---------------------------------------------------------------------------------------------- positions


def _brute_aligned(se, te):
    out = []
    for i in range(len(se) - 1):
        if not se[i] > (se[i - 1] if i else 0):
            continue
        for j in range(len(te) - 1):
            if te[j] > (te[j - 1] if j else 0) and se[i] == te[j]:
                out.append((i, j))
    return out


def test_aligned_positions_match_a_double_loop(toks):
    for text in TEXTS:
        se = ct.byte_ends(text, _encode(toks["byte_level"], text)[1])
        te = ct.byte_ends(text, _encode(toks["metaspace"], text)[1])
        s, t = ct.aligned_positions(se, te)
        assert s.dtype == t.dtype == np.int64
        assert list(zip(s.tolist(), t.tolist())) == _brute_aligned(se.tolist(), te.tolist())
        assert (se[s] == te[t]).all()
    rng = np.random.default_rng(0)
    for _ in range(50):
        se = np.cumsum(rng.integers(0, 3, rng.integers(0, 30)))
        te = np.cumsum(rng.integers(0, 3, rng.integers(0, 30)))
        s, t = ct.aligned_positions(se, te)
        assert list(zip(s.tolist(), t.tolist())) == _brute_aligned(se.tolist(), te.tolist())
    text = TEXTS[0]                                             # the two tiny tokenizers do differ
    se = ct.byte_ends(text, _encode(toks["byte_level"], text)[1])
    te = ct.byte_ends(text, _encode(toks["metaspace"], text)[1])
    assert len(se) != len(te) and 0 < len(ct.aligned_positions(se, te)[0]) < len(se) - 1


# ---------------------------------------------------------------------------------------------- vocabularies


def test_vocab_map_pairs_ids_of_equal_bytes(toks):
    s, t = toks["byte_level"], toks["metaspace"]
    sb, tb = ct.token_bytes(s), ct.token_bytes(t)
    m = ct.vocab_map(s, t)
    assert m.dtype == np.int64 and len(m) == len(tb) == len(t)
    for i, b in enumerate(tb):
        if m[i] >= 0:
            assert sb[m[i]] == b
        elif b is not None:
            assert b not in sb
    for special in t.all_special_ids + [t.convert_tokens_to_ids("<pad>")]:
        assert m[special] == -1 and tb[special] is None
    assert sb[s.convert_tokens_to_ids("<|endoftext|>")] is None
    assert tb[t.convert_tokens_to_ids("\n\n")] == b"\n\n"                   # a non-special added token
    assert tb[t.convert_tokens_to_ids("<0x0A>")] == b"\n" and tb[t.convert_tokens_to_ids("▁café")] == " café".encode()
    assert sb[s.convert_tokens_to_ids("Ġ")] == b" " and sb[s.convert_tokens_to_ids("Ã")] == b"\xc3"
    assert m[t.convert_tokens_to_ids("<0xC3>")] == s.convert_tokens_to_ids("Ã")    # one byte, both sides
    back = ct.vocab_map(t, s)                                               # round trip
    for i in np.flatnonzero(back >= 0):
        assert tb[back[i]] == sb[i]
        if sb[i] not in (b"\n",):
            assert m[back[i]] == i
    # the byte-fallback id gives way to the ordinary token of the same byte
    a_ordinary, a_fallback = t.convert_tokens_to_ids("a"), t.convert_tokens_to_ids("<0x61>")
    assert back[s.convert_tokens_to_ids("a")] == a_ordinary != a_fallback
    assert m[a_fallback] == m[a_ordinary] == s.convert_tokens_to_ids("a")   # many teacher ids -> one student id
    same = ct.vocab_map(s, s)
    specials = {*s.all_special_ids, s.convert_tokens_to_ids("<|endoftext|>")}
    assert [i for i in range(len(same)) if same[i] != i] == sorted(specials)
    padded = ct.vocab_map(s, t, teacher_vocab_size=len(t) + 5)
    assert len(padded) == len(t) + 5 and (padded[len(t):] == -1).all() and (padded[:len(t)] == m).all()


def test_vocab_map_leaves_ambiguous_bytes_unmapped():
    """Two ordinary student tokens of the same bytes ("▁x" and " x" both read " x"): −1."""
    ambiguous = fast_tokenizer(metaspace_tokenizer(extra=["▁é", " é"]))
    teacher = fast_tokenizer(metaspace_tokenizer(extra=["▁é"]))
    m = ct.vocab_map(ambiguous, teacher)
    assert ct.token_bytes(ambiguous).count(" é".encode()) == 2
    assert m[teacher.convert_tokens_to_ids("▁é")] == -1 and m[teacher.convert_tokens_to_ids("é")] >= 0


def test_an_unsupported_decoder_is_a_user_error():
    from tokenizers import Tokenizer, decoders, models

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.decoder = decoders.WordPiece()
    with pytest.raises(UserError, match="cannot tell the bytes"):
        ct.token_bytes(wp)


# ---------------------------------------------------------------------------------------------- losses


def _random_targets(n, vt, k, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vt, generator=g, dtype=torch.float64) * scale
    logp, idx, tail = topk_targets(teacher, k)
    return logp.astype(np.float64), idx.astype(np.int64), tail.astype(np.float64)


def _reference_kl(z, logp, idx, tail, mapping, temperature):
    """Dense, by loops: the teacher rebuilt over its vocabulary (tail even), tempered; mapped masses
    added per student id; one rest bucket each side."""
    vt, k = len(mapping), logp.shape[1]
    out = []
    for n in range(len(z)):
        dense = np.full(vt, math.exp(tail[n]) / (vt - k) if k < vt else 0.0)
        dense[idx[n]] = np.exp(logp[n])
        with np.errstate(divide="ignore"):
            a = np.log(dense) / temperature
        q = np.exp(a - a.max())
        q /= q.sum()
        s = torch.softmax(torch.as_tensor(z[n], dtype=torch.float64) / temperature, -1).numpy()
        qj: dict[int, float] = {}
        for i in idx[n]:
            if mapping[i] >= 0:
                qj[int(mapping[i])] = qj.get(int(mapping[i]), 0.0) + q[i]
        q_rest, s_rest = 1 - sum(qj.values()), 1 - sum(s[j] for j in qj)
        kl = sum(v * math.log(v / s[j]) for j, v in qj.items() if v > 0)
        out.append(kl + (q_rest * math.log(q_rest / s_rest) if q_rest > 1e-15 else 0.0))
    return np.array(out)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mapped_kl_matches_a_dense_reference(temperature):
    n, vt, vs, k = 6, 9, 7, 4
    logp, idx, tail = _random_targets(n, vt, k)
    mapping = np.array([3, -1, 0, 5, 3, -1, 1, 6, 2])            # ids 0 and 4 share student id 3
    z = torch.randn(n, vs, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    z[0] = torch.tensor([0.0, 0, 0, 12, 0, 12, 0], dtype=torch.float64)   # peaked rows: the exact rest
    z[2, mapping[idx[2][mapping[idx[2]] >= 0]]] += 15
    idx[1] = [0, 4, 1, 2]                                          # both duplicates in one top-k
    got = ct.mapped_kl(z, logp, idx, tail, mapping, temperature)
    assert got.dtype == torch.float64 and got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), _reference_kl(z.numpy(), logp, idx, tail, mapping, temperature),
                               rtol=1e-9, atol=1e-12)
    assert (got >= 0).all()


def test_mapped_kl_when_the_mapped_ids_cover_the_whole_student_vocabulary():
    """Row 0 maps onto every student id (its rest is empty on both sides), row 1 is peaked on two of
    them (its rest is computed exactly): one batch, both paths."""
    logp = np.log([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    idx, tail = np.array([[0, 1, 2], [0, 1, 3]]), np.array([-np.inf, -np.inf])
    mapping = np.array([0, 1, 2, -1])
    z = torch.tensor([[1.0, 0.5, 0.0], [9.0, 9.0, 0.0]], dtype=torch.float64, requires_grad=True)
    got = ct.mapped_kl(z, logp, idx, tail, mapping)
    np.testing.assert_allclose(got.detach().numpy(), _reference_kl(z.detach().numpy(), logp, idx, tail, mapping, 1.0),
                               rtol=1e-9)
    got.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identical_vocabularies_give_topk_forward_kl(temperature):
    n, v, k = 20, 50, 5
    logp, idx, tail = _random_targets(n, v, k, seed=3)
    z = torch.randn(n, v, generator=torch.Generator().manual_seed(4)) * 3
    z[0, idx[0]] += 8                                            # a peaked row
    ours = ct.mapped_kl(z, logp, idx, tail, np.arange(v), temperature).mean()
    theirs = sparse_divergence(z, logp[:, None], idx[:, None], tail[:, None], v, temperature)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-7)
    logp, idx, tail = _random_targets(n, v, v, seed=3)                # k = V: no tail, the dense KL
    full = ct.mapped_kl(z.double(), logp, idx, tail, np.arange(v), temperature)
    dense_t = torch.log_softmax(torch.zeros(n, v, dtype=torch.float64).scatter(1, torch.as_tensor(idx),
                                                                             torch.as_tensor(logp)) / temperature, -1)
    dense = (dense_t.exp() * (dense_t - torch.log_softmax(z.double() / temperature, -1))).sum(-1)
    np.testing.assert_allclose(full.numpy(), dense.numpy(), rtol=1e-9, atol=1e-12)


def test_mapped_kl_is_zero_for_a_student_that_matches():
    n, vt, vs, k = 5, 12, 10, 4
    logp, idx, tail = _random_targets(n, vt, k, seed=5)
    mapping = np.array([0, 1, 2, 3, 4, 5, -1, -1, 6, 7, 8, -1])
    z = torch.empty(n, vs, dtype=torch.float64)
    for r in range(n):                                            # the mapped masses in place, the rest spread
        q = np.exp(logp[r]) / (np.exp(logp[r]).sum() + np.exp(tail[r]))    # float16 targets: normalise
        mass = np.zeros(vs)
        for i, qi in zip(idx[r], q):
            if mapping[i] >= 0:
                mass[mapping[i]] += qi
        free = mass == 0
        mass[free] = (1 - mass.sum()) / free.sum()
        z[r] = torch.as_tensor(np.log(mass))
    assert float(ct.mapped_kl(z, logp, idx, tail, mapping).abs().max()) < 1e-12
    assert (ct.mapped_kl(z + torch.randn(n, vs, dtype=torch.float64), logp, idx, tail, mapping) > 1e-6).all()


def test_uld_by_hand():
    # teacher, V = 5, k = 3: p = (0.5, 0.2, 0.1) on ids (0, 3, 4), r = 0.2; id 0 maps to student 1, 3 and 4 do not
    logp = np.log([[0.5, 0.2, 0.1]])
    idx, tail = np.array([[0, 3, 4]]), np.log([0.2])
    mapping = np.array([1, -1, -1, -1, -1])
    s = np.array([0.4, 0.3, 0.05, 0.15, 0.1])                     # the student, V = 5; id 1 is the mapped one
    z = torch.tensor(np.log(s)[None])
    # u = (0.2, 0.1, 0); v = the two largest outside {1}: (0.4, 0.15), then 0 (m = 2)
    expected = abs(0.2 - 0.4) + abs(0.1 - 0.15) + 0.0
    assert float(ct.uld(z, logp, idx, tail, mapping)) == pytest.approx(expected, abs=1e-12)
    # the right masses on other tokens: ULD is blind to which token
    s2 = np.array([0.1, 0.3, 0.2, 0.05, 0.35])                    # outside {1}: 0.35, 0.2, ...
    z2 = torch.tensor(np.log(s2)[None])
    assert float(ct.uld(z2, np.log([[0.3, 0.35, 0.2]]), idx, np.log([0.15]), mapping)) == pytest.approx(0.0, abs=1e-12)
    # at T = 2 both sides are tempered: the teacher over its buckets (tail spread over V − k = 2 ids)
    a = np.array([math.log(0.5), math.log(0.2), math.log(0.1), math.log(0.1), math.log(0.1)]) / 2
    q = np.exp(a) / np.exp(a).sum()
    st = np.exp(np.log(s) / 2) / np.exp(np.log(s) / 2).sum()
    expected_t = abs(q[1] - st[0]) + abs(q[2] - st[3])
    assert float(ct.uld(z, logp, idx, tail, mapping, 2.0)) == pytest.approx(expected_t, abs=1e-12)
    # all mapped: nothing for ULD; none mapped and a tiny student vocabulary: zero-padded
    assert float(ct.uld(z, logp, idx, tail, np.array([1, 2, 0, 3, 4]))) == 0.0
    none = ct.uld(torch.tensor([[0.0, math.log(3)]], dtype=torch.float64), logp, idx, tail, np.full(5, -1))
    assert float(none) == pytest.approx(abs(0.5 - 0.75) + abs(0.2 - 0.25) + 0.1, abs=1e-12)


def test_hybrid_loss_is_the_weighted_mean():
    n, vt, vs, k = 7, 11, 9, 4
    logp, idx, tail = _random_targets(n, vt, k, seed=6)
    mapping = np.array([0, 1, -1, 2, 3, -1, 4, 5, -1, 6, 7])
    z = torch.randn(n, vs, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w = torch.rand(n, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kl, u = ct.mapped_kl(z, logp, idx, tail, mapping, 1.5), ct.uld(z, logp, idx, tail, mapping, 1.5)
    got = ct.hybrid_loss(z, logp, idx, tail, mapping, 1.5, beta=0.3, weights=w)
    assert float(got) == pytest.approx(float((w * (kl + 0.3 * u)).mean()), rel=1e-12)
    assert float(ct.hybrid_loss(z, logp, idx, tail, mapping, beta=0.0)) == pytest.approx(float(ct.mapped_kl(
        z, logp, idx, tail, mapping).mean()), rel=1e-12)
    assert float(ct.hybrid_loss(z[:0], logp[:0], idx[:0], tail[:0], mapping)) == 0.0
    half = ct.hybrid_loss(z.float(), logp.astype(np.float16), idx.astype(np.uint8), tail.astype(np.float16), mapping)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_gradients_are_right():
    n, vt, vs, k = 4, 9, 7, 4
    logp, idx, tail = _random_targets(n, vt, k, seed=9)
    mapping = np.array([3, -1, 0, 5, 3, -1, 1, 6, 2])
    idx[1] = [0, 4, 1, 2]
    z = torch.randn(n, vs, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    z[0] = torch.tensor([0.0, 0.3, -0.2, 9, 0.1, 9, 0.4], dtype=torch.float64)    # peaked: the exact rest path
    w = torch.rand(n, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    z.requires_grad_(True)
    for fn in (lambda x: ct.mapped_kl(x, logp, idx, tail, mapping, 1.3),
               lambda x: ct.uld(x, logp, idx, tail, mapping, 1.3),
               lambda x: ct.hybrid_loss(x, logp, idx, tail, mapping, 1.3, beta=0.5, weights=w)):
        assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)


def test_end_to_end_on_the_tiny_tokenizers(toks):
    """Aligned positions, map and loss on real (tiny) tokenizations: finite, with a gradient."""
    s_tok, t_tok = toks["byte_level"], toks["metaspace"]
    text = TEXTS[0]
    s_ids, s_off = _encode(s_tok, text)
    t_ids, t_off = _encode(t_tok, text)
    s_pos, t_pos = ct.aligned_positions(ct.byte_ends(text, s_off), ct.byte_ends(text, t_off))
    mapping = ct.vocab_map(s_tok, t_tok)
    teacher = torch.randn(len(t_ids), len(t_tok), generator=torch.Generator().manual_seed(12))
    logp, idx, tail = topk_targets(teacher, 8)
    z = torch.randn(len(s_ids), len(s_tok), generator=torch.Generator().manual_seed(13), requires_grad=True)
    loss = ct.hybrid_loss(z[torch.as_tensor(s_pos)], logp[t_pos], idx[t_pos], tail[t_pos], mapping, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(z.grad).all()
    assert (z.grad.abs().sum(-1) > 0).tolist() == [i in set(s_pos.tolist()) for i in range(len(s_ids))]


def test_bits_per_byte():
    assert ct.bits_per_byte(math.log(2) * 12, 4) == pytest.approx(3.0)
    assert ct.bits_per_char(math.log(2) * 12, 3) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        ct.bits_per_byte(1.0, 0)
    with pytest.raises(ValueError):
        ct.bits_per_char(1.0, 0)
