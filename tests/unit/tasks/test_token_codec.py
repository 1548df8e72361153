"""The token task's codec (ensemblekd.tasks.token.encode/decode): top-k targets stored exactly and small."""

import numpy as np
import torch

from ensemblekd.store import unpack
from ensemblekd.tasks.token import LEVELS, decode, encode
from ensemblekd.topk import topk_targets


def _lm_like_logits(n: int, v: int, g: torch.Generator, prior: float = 0.5, noise: float = 1.5) -> torch.Tensor:
    """Zipf unigram prior over a frequency-ordered vocabulary + noise + 8 power-law context candidates."""
    z = -prior * torch.log1p(torch.arange(v, dtype=torch.float32)) + noise * torch.randn(n, v, generator=g)
    cand = ((torch.rand(n, 8, generator=g) ** (-1 / 0.8) - 1) * 10).long().clamp(max=v - 1)
    return z.scatter_add_(1, cand, 6.0 + 2.5 * torch.randn(n, 8, generator=g))


def test_store_round_trip_is_exact_and_small():
    n, v, k = 1024, 32000, 32
    logp, idx, tail = topk_targets(_lm_like_logits(n, v, torch.Generator().manual_seed(7)), k)
    lengths = np.array([511, 1, 400, 0, 112])
    data, entry = encode(np.arange(5) + 100, lengths, logp, idx, tail)
    assert entry["rows"] == 5 and entry["tokens"] == n and entry["bytes"] == len(data) and len(entry["sha256"]) == 64
    ids, lens, logp2, idx2, tail2, nxt, own_tokens, ends = decode(unpack(data))
    assert nxt is None and own_tokens is None and ends is None  # a store written before next_logprob existed still decodes
    assert ids.tolist() == list(range(100, 105)) and lens.tolist() == lengths.tolist()
    assert logp2.dtype == np.float16 and idx2.dtype == np.uint16 and tail2.dtype == np.float16
    assert np.array_equal(logp2.view(np.uint16), logp.view(np.uint16)) and np.array_equal(idx2, idx)
    assert np.array_equal(tail2.view(np.uint16), tail.view(np.uint16))
    logp, idx, tail = topk_targets(torch.randn(6, 70_000, generator=torch.Generator().manual_seed(9)), 4)
    _, _, _, idx2, *_ = decode(unpack(encode(np.arange(2), np.array([2, 4]), logp, idx, tail)[0]))
    assert idx2.dtype == np.uint32 and np.array_equal(idx2, idx)
    per_token = len(data) / n
    print(f"store: {per_token:.1f} B/token at k = {k}, V = {v} (plain float16 + int32: 192)")
    assert per_token <= 100


def test_next_token_logprob_is_stored_exactly_and_matches_the_softmax():
    from ensemblekd.topk import next_token_logprobs

    logits = _lm_like_logits(300, 5000, torch.Generator().manual_seed(3))
    following = torch.randint(0, 5000, (300,), generator=torch.Generator().manual_seed(4))
    nxt = next_token_logprobs(logits, following, chunk_tokens=64)
    want = torch.log_softmax(logits, -1).gather(-1, following[:, None]).squeeze(-1)
    assert np.allclose(nxt.astype(np.float32), want.numpy(), atol=2e-2)  # float16 of values down to about -20
    logp, idx, tail = topk_targets(logits, 8)
    data, _ = encode(np.arange(3), np.array([100, 150, 50]), logp, idx, tail, nxt=nxt)
    got = decode(unpack(data)).next
    assert np.array_equal(got.view(np.uint16), nxt.view(np.uint16))


def test_ranked_codec_keeps_each_tokens_ids_and_log_probs_to_within_a_level_in_fewer_bytes():
    n, v, k = 2048, 32000, 32
    # a strong unigram prior, as in a real LM's top-k (which the ranks exploit; on ids spread evenly
    # over the vocabulary the codec gains nothing: 91.1 against 91.8 B/token)
    logp, idx, tail = topk_targets(_lm_like_logits(n, v, torch.Generator().manual_seed(11), 1.0, 1.0), k)
    lengths = np.array([1000, 0, 1048])
    plain, _ = encode(np.arange(3), lengths, logp, idx, tail)
    data, entry = encode(np.arange(3), lengths, logp, idx, tail, codec="ranked")
    assert entry["tokens"] == n and entry["bytes"] == len(data)
    back = decode(unpack(data))
    assert back.lengths.tolist() == lengths.tolist() and back.logp.dtype == np.float16 and back.idx.dtype == np.uint16
    # the same ids per token, each with its own log-prob to within half a level (+ the renormalisation)
    order, order2 = np.argsort(idx, 1), np.argsort(back.idx, 1)
    assert np.array_equal(np.take_along_axis(idx, order, 1), np.take_along_axis(back.idx, order2, 1))
    was = np.take_along_axis(logp.astype(np.float32), order, 1)
    got = np.take_along_axis(back.logp.astype(np.float32), order2, 1)
    spacing = np.diff(LEVELS)[np.clip(np.searchsorted(LEVELS, -was), 1, len(LEVELS) - 1) - 1]
    assert (np.abs(got - was) <= spacing / 2 + 0.05).all()                       # + the renormalisation
    assert (np.diff(back.logp.astype(np.float32), axis=1) <= 0).all()          # descending, as float16 stores it
    mass = np.exp(back.logp.astype(np.float64)).sum(1) + np.exp(back.tail.astype(np.float64))
    assert np.abs(mass - 1).max() < 2e-3
    kl = (np.exp(was) * (was - got)).sum(1)                                     # over the top-k: small
    assert np.abs(kl).mean() < 2e-3
    print(f"ranked: {len(data) / n:.1f} B/token against float16's {len(plain) / n:.1f} (k = {k}, V = {v})")
    assert len(data) < 0.7 * len(plain)


def test_ranked_codec_handles_wide_vocabularies_and_empty_shards():
    logp, idx, tail = topk_targets(torch.randn(6, 70_000, generator=torch.Generator().manual_seed(9)), 4)
    back = decode(unpack(encode(np.arange(2), np.array([2, 4]), logp, idx, tail, codec="ranked")[0]))
    assert back.idx.dtype == np.uint32 and np.array_equal(np.sort(back.idx, 1), np.sort(idx, 1))
    empty = decode(unpack(encode(np.arange(1), np.array([0]), logp[:0], idx[:0], tail[:0], codec="ranked")[0]))
    assert empty.logp.shape == (0, 4) and empty.lengths.tolist() == [0]


def test_a_teacher_with_its_own_tokenizer_keeps_its_tokens_and_their_byte_ends():
    logp, idx, tail = topk_targets(torch.randn(7, 50), 4)
    lengths = np.array([3, 0, 4])                               # positions; a row holds one token more
    own = (np.arange(10, dtype=np.int32), np.array([1, 2, 4, 6, 3, 1, 2, 5, 7, 9], np.int32))
    back = decode(unpack(encode(np.arange(3), lengths, logp, idx, tail, own=own)[0]))
    assert back.lengths.tolist() == [3, 0, 4]
    assert back.own_tokens.tolist() == own[0].tolist() and back.byte_ends.tolist() == own[1].tolist()
