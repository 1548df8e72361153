"""The token task's label-shard codec: one Parquet shard per input shard, a row per sequence: id
int64, topk_logprobs list<fixed_size_list<halffloat>[k]>, topk_indices list<fixed_size_list<uintN>[k]>
(the narrowest unsigned type for V), tail_logprob list<halffloat>, next_logprob list<halffloat>;
position j predicts token j + 1; a teacher with its own tokenizer adds own_tokens and byte_ends
list<int32> (its tokens and their byte ends in the row's text). store.codec: ranked stores topk_codes list<fixed_size_list<uint8>[k]>
and rank gaps in topk_indices instead (below). encode writes a shard, decode reads one (Task.decode)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from ensemblekd.store import pack


# -- the codec ---------------------------------------------------------------------------------
# Writer settings by measurement (B/token, k = 32, V = 32k, Zipf-like LM targets; float16 + int32
# would be 192, float16 + uint16 130): snappy with dictionaries (pyarrow's default) 129; zstd
# without dictionaries (no value repeats enough to pay) 114; + byte-stream-split, which groups the
# values' high bytes (the sorted log-probs' exponents, the ids' mostly small or zero upper bytes)
# 88; zstd level ≥ 17 (its optimal parser) 82.5. Level 3 (88.7) is the default: on the tiny LM
# teachers' real targets it wrote 824k tokens/s a core against 26k at level 19, for 58.3 against
# 51.7 B/token; at 19 the writer, not the teacher, set the label stage's pace
# (store.compression_level chooses). Reading speed does not depend on the level.
# Data pages v2 leave the nested lists' repetition levels uncompressed (+10); DELTA_BINARY_PACKED
# ids +16; brotli 11 −3% but 7× slower to write and 2× slower to read; statistics are useless here.
ZSTD_LEVEL = 3
_SPLIT = ["topk_logprobs.list.element.list.element", "topk_indices.list.element.list.element",
          "topk_codes.list.element.list.element", "tail_logprob.list.element", "next_logprob.list.element"]

# store.codec: ranked (measured on SmolLM2 over pydoc text, tools/bench_lm_real.py: 58.8 against
# 92.6 B/token at k = 32, 205 against 360 at k = 128, KL(full || stored) the same to 1e-4 nats).
# The ids become their rank in the shard's id frequency (the map, ids by decreasing count, rides
# in the file's key-value metadata), sorted per token and delta-coded: small gaps between frequent
# ids compress far better than ids in log-p order. Each log-prob becomes the index of the nearest
# of 256 levels of −log p whose step doubles every 4 nats (1/16 nat to 4, 1/8 to 8, 1/4 to 12,
# 1/2 to 83.5): an error of 1/32 nat on a likely id costs as much KL as 1/4 nat on one of
# p < e^−8. Decoding re-sorts each token by log-prob and renormalises top-k + tail to sum to 1;
# ids whose codes tie come back by rank, so a top-1 within 1/32 nat of the second may swap.
CODECS = ("float16", "ranked")
LEVELS = np.concatenate([np.arange(64) / 16, 4 + np.arange(32) / 8, 8 + np.arange(16) / 4, 12 + np.arange(144) / 2])
_MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2


def parquet_options(level: int = ZSTD_LEVEL) -> dict[str, Any]:
    """pyarrow.parquet.write_table options for a token shard (lossless: values are stored as given)."""
    return {"compression": "zstd", "compression_level": level, "use_dictionary": False,
            "use_byte_stream_split": _SPLIT, "write_statistics": False, "data_page_version": "1.0"}


def _ranked(logp: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[bytes, bytes]]:
    """(uint8 codes, rank gaps in idx's dtype, metadata): the ranked codec's columns of one shard."""
    seen, count = np.unique(idx, return_counts=True)
    by_count = seen[np.argsort(-count, kind="stable")].astype(idx.dtype)
    rank = np.zeros(int(seen[-1]) + 1 if len(seen) else 1, idx.dtype)
    rank[by_count] = np.arange(len(by_count))
    ranks = rank[idx]
    order = np.argsort(ranks, axis=1, kind="stable")
    gaps = np.diff(np.take_along_axis(ranks, order, 1).astype(np.int64), axis=1, prepend=0).astype(idx.dtype)
    codes = np.searchsorted(_MIDPOINTS, -np.take_along_axis(logp, order, 1).astype(np.float32)).astype(np.uint8)
    meta = {b"ranked_ids": pa.compress(by_count.tobytes(), codec="zstd", asbytes=True),
            b"ranked_ids_count": str(len(by_count)).encode()}
    return codes, gaps, meta


def _unranked(codes: np.ndarray, gaps: np.ndarray, tail: np.ndarray, meta: dict[bytes, bytes]):
    """_ranked undone: (log-probs float16 descending, ids, tail float16), top-k + tail summing to 1."""
    count = int(meta[b"ranked_ids_count"])
    by_count = np.frombuffer(pa.decompress(meta[b"ranked_ids"], decompressed_size=count * gaps.itemsize,
                                           codec="zstd", asbytes=True), gaps.dtype)
    ids = by_count[np.cumsum(gaps, axis=1, dtype=np.int64)]
    logp = -LEVELS[codes]
    order = np.argsort(codes, axis=1, kind="stable")            # ascending −log p: descending log p
    logp, ids = np.take_along_axis(logp, order, 1), np.take_along_axis(ids, order, 1)
    tail64 = tail.astype(np.float64)
    norm = np.log(np.exp(logp).sum(1) + np.exp(tail64))
    return ((logp - norm[:, None]).astype(np.float16), ids.astype(gaps.dtype),
            (tail64 - norm).astype(np.float16))


def encode(ids: np.ndarray, lengths: np.ndarray, logp: np.ndarray, idx: np.ndarray, tail: np.ndarray,
           level: int = ZSTD_LEVEL, nxt: np.ndarray | None = None, codec: str = "float16",
           own: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[bytes, dict[str, Any]]:
    """Parquet bytes of one token shard (row r: sequence ids[r], lengths[r] positions) and its
    manifest entry: rows, tokens, bytes, sha256. idx keeps its dtype (index_dtype(V) from topk_targets).
    nxt [N]: the log-prob of the token that follows each position (its perplexity on the split,
    exact whether or not that token is in the top k); 2 B/token before compression.
    codec: float16 (lossless) or ranked (above; topk_codes uint8 instead of topk_logprobs).
    own: a teacher with a tokenizer of its own (docs/cross-tokenizer.md): its token ids and each
    token's UTF-8 byte end in the row's text, flat [sum(lengths + 1)], stored per row as own_tokens
    and byte_ends list<int32> (a row's tokens are its positions + 1)."""
    n, k = logp.shape
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) != len(ids) or lengths.sum() != n or idx.shape != (n, k) or tail.shape != (n,):
        raise ValueError(f"{len(ids)} rows of {lengths.sum()} positions for logp {logp.shape}, idx {idx.shape}, "
                         f"tail {tail.shape}")
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r}: not one of {CODECS}")
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())

    def per_row(values: np.ndarray, arrow_type=None) -> pa.ListArray:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1), arrow_type)
        tokens = pa.FixedSizeListArray.from_arrays(flat, k) if values.ndim == 2 else flat
        return pa.ListArray.from_arrays(offsets, tokens)

    meta = None
    if codec == "ranked":
        codes, gaps, meta = _ranked(logp, idx)
        topk = {"topk_codes": per_row(codes), "topk_indices": per_row(gaps)}
    else:
        topk = {"topk_logprobs": per_row(logp.astype(np.float16, copy=False), pa.float16()),
                "topk_indices": per_row(idx)}
    columns = {"id": pa.array(np.asarray(ids), pa.int64()), **topk,
               "tail_logprob": per_row(tail.astype(np.float16, copy=False), pa.float16())}
    if nxt is not None:
        columns["next_logprob"] = per_row(np.asarray(nxt).astype(np.float16), pa.float16())
    if own is not None:
        token_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths + 1)]), pa.int32())
        for name, values in zip(("own_tokens", "byte_ends"), own):
            columns[name] = pa.ListArray.from_arrays(token_offsets, pa.array(np.asarray(values, np.int32), pa.int32()))
    data, entry = pack(pa.table(columns, metadata=meta), **parquet_options(level))
    return data, {**entry, "tokens": int(n)}


class TopK(NamedTuple):
    """A decoded token shard; the value arrays are views of the Arrow buffers (float16 codec)."""

    ids: np.ndarray      # [R] int64
    lengths: np.ndarray  # [R] positions per row (L - 1)
    logp: np.ndarray     # [N, k] float16
    idx: np.ndarray      # [N, k] as stored
    tail: np.ndarray     # [N] float16
    next: np.ndarray | None = None  # [N] float16: log p of the following token (stores from 2026-11-29 on)
    own_tokens: np.ndarray | None = None  # [N + R] int32: a teacher's own token ids (its own tokenizer)
    byte_ends: np.ndarray | None = None   # [N + R] int32: the byte end of each of them in the row's text


def decode(table: pa.Table) -> TopK:
    """A shard of either codec (a ranked shard has topk_codes in place of topk_logprobs)."""
    def tokens(name: str) -> pa.Array:
        return table[name].combine_chunks().flatten()           # the positions of every row, in order

    def matrix(name: str) -> np.ndarray:
        values = tokens(name)
        return values.flatten().to_numpy().reshape(-1, values.type.list_size)

    lengths = table["tail_logprob"].combine_chunks().value_lengths().to_numpy().astype(np.int64)
    tail, idx = tokens("tail_logprob").to_numpy(), matrix("topk_indices")
    if "topk_codes" in table.column_names:
        logp, idx, tail = _unranked(matrix("topk_codes"), idx, tail, table.schema.metadata)
    else:
        logp = matrix("topk_logprobs")
    present = lambda name: tokens(name).to_numpy() if name in table.column_names else None  # noqa: E731
    return TopK(table["id"].to_numpy().astype(np.int64), lengths, logp, idx, tail, present("next_logprob"),
                present("own_tokens"), present("byte_ends"))
