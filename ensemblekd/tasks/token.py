"""task: token — causal LMs distilled token by token from compressed top-k targets.

Rows are sequences of token ids. A teacher's logits at position j predict token j + 1, so a
sequence of L tokens gives L − 1 stored positions: per position the top-k log-probs of the full
softmax, their ids and the tail mass (ensemblekd.topk). The student trains on every position
whose next token is a target (data.loss_mask, padding excluded) with topk.token_loss; the
strategy's per-token teacher weights come from the same rules as for classification, fed the
sparse targets through topk.rule_inputs. Teachers, student and the store share one vocabulary
(data.vocab_size) and its tokenizer hash (ensemblekd.lm.vocab_hash), recorded in the manifest.

Label shards (the codec below): one Parquet shard per input shard, a row per sequence: id int64,
topk_logprobs list<fixed_size_list<halffloat>[k]>, topk_indices list<fixed_size_list<uintN>[k]>
(the narrowest unsigned type for V), tail_logprob list<halffloat>, next_logprob list<halffloat>;
position j predicts token j + 1. store.codec: ranked stores topk_codes list<fixed_size_list<uint8>[k]>
and rank gaps in topk_indices instead (below).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from ensemblekd.config import Config
from ensemblekd.data.inputs import InputShard, check_columns, input_shards, read_token_shard
from ensemblekd.errors import UserError
from ensemblekd.lm import fit_lm, logits_of, vocab_hash
from ensemblekd.losses import divergence
from ensemblekd.store import Store, pack
from ensemblekd.tasks.base import Column, Served, Task, read_aligned, row_batches, run_on
from ensemblekd.teachers import kind_of
from ensemblekd.topk import dense_from_topk, rule_inputs, token_loss, topk_targets

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
           level: int = ZSTD_LEVEL, nxt: np.ndarray | None = None, codec: str = "float16") -> tuple[bytes, dict[str, Any]]:
    """Parquet bytes of one token shard (row r: sequence ids[r], lengths[r] positions) and its
    manifest entry: rows, tokens, bytes, sha256. idx keeps its dtype (index_dtype(V) from topk_targets).
    nxt [N]: the log-prob of the token that follows each position (its perplexity on the split,
    exact whether or not that token is in the top k); 2 B/token before compression.
    codec: float16 (lossless) or ranked (above; topk_codes uint8 instead of topk_logprobs)."""
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
    return TopK(table["id"].to_numpy().astype(np.int64), lengths, logp, idx, tail,
                tokens("next_logprob").to_numpy() if "next_logprob" in table.column_names else None)


# -- the vocabulary ------------------------------------------------------------------------------
def vocabulary(cfg: Config) -> dict[str, Any]:
    """The manifest's record of the shared vocabulary: size, tokenizer hash, top-k and codec.

    data.tokenizer names a local tokenizer directory, or 'teachers': the tokenizers that come with
    the teachers (kind huggingface), which must all agree. Without one the ids are synthetic and
    the hash says so.
    """
    d = cfg.data
    assert d.vocab_size is not None  # check_config requires it
    own = {t.name: kind_of(t).tokenizer(t) for t in cfg.teachers}
    own = {name: path for name, path in own.items() if path}
    if d.tokenizer == "teachers":
        hashes = {name: vocab_hash(path) for name, path in own.items()}
        if len(set(hashes.values())) > 1:
            raise UserError(f"teachers.pretrained: the teachers' tokenizers differ (vocabulary hashes {hashes}); "
                            "token-level distillation needs one shared tokenizer")
        digest = next(iter(hashes.values()))
    else:
        digest = vocab_hash(d.tokenizer if d.tokenizer else d.vocab_size)
        for name, path in own.items():
            if d.tokenizer and vocab_hash(path) != digest:
                raise UserError(f"teacher '{name}': its tokenizer (hash {vocab_hash(path)}) is not "
                                f"data.tokenizer's (hash {digest}); all teachers and the student must share one")
    return {"vocab_size": d.vocab_size, "vocab_hash": digest, "top_k": min(cfg.store.top_k, d.vocab_size),
            "codec": cfg.store.codec}


def tokenizer_path(cfg: Config) -> str | None:
    """The shared tokenizer: data.tokenizer, or with 'teachers' the first pretrained teacher's own
    (vocabulary() checks that they all agree); None for synthetic ids."""
    if cfg.data.tokenizer != "teachers":
        return cfg.data.tokenizer
    return next((p for p in (kind_of(t).tokenizer(t) for t in cfg.teachers) if p), None)


_warned_padding: set[str] = set()


def shared_vocabulary(logits: torch.Tensor, vocab_size: int, who: str) -> torch.Tensor:
    """Logits cut to the shared vocabulary: a model padded past it (e.g. 152064 rows for a
    151936-token vocabulary) is truncated with a warning; a smaller one cannot be used."""
    if logits.shape[-1] < vocab_size:
        raise UserError(f"{who}: outputs {logits.shape[-1]} logits per token, fewer than data.vocab_size {vocab_size}; "
                        "it was built for another vocabulary")
    if logits.shape[-1] > vocab_size and who not in _warned_padding:
        _warned_padding.add(who)
        print(f"warning: {who} outputs {logits.shape[-1]} logits per token; using the first {vocab_size} "
              "(data.vocab_size), the rest is padding", file=sys.stderr, flush=True)
    return logits[..., :vocab_size]


# -- batches -------------------------------------------------------------------------------------
class TokenBatch(NamedTuple):
    """A micro-batch of sequences and the N target positions in it."""

    tokens: torch.Tensor        # [B, L] long, right-padded
    positions: torch.Tensor     # [N] flat index into the student's [B * L] positions
    labels: torch.Tensor        # [N] the next token at each position
    logp: torch.Tensor          # [N, K, k] teachers' top-k log-probs (float16)
    idx: torch.Tensor           # [N, K, k]
    tail: torch.Tensor          # [N, K] log tail mass (float16)


class Sequences(NamedTuple):
    """One input shard for training: its sequences and, per teacher, (offsets [R + 1], logp, idx, tail)."""

    tokens: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray
    targets: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def make_batch(rows: np.ndarray, tokens, lengths, mask, targets) -> TokenBatch:
    width = int(lengths[rows].max())
    inside = np.arange(1, width)[None, :] < lengths[rows][:, None]  # padding is never a target, whatever the mask
    r, j = np.nonzero(mask[rows, 1:width] & inside)     # position j of batch row r predicts token j + 1
    src = rows[r]
    labels = tokens[src, j + 1]
    picked = [(o[src] + j) for o, *_ in targets]
    stack = (lambda i: np.stack([t[i][p] for t, p in zip(targets, picked)], axis=1)) if targets else None
    n = len(r)
    return TokenBatch(torch.from_numpy(np.ascontiguousarray(tokens[rows, :width])), torch.from_numpy(r * width + j),
                      torch.from_numpy(labels),
                      torch.from_numpy(stack(1)) if stack else torch.zeros(n, 0, 0, dtype=torch.float16),
                      torch.from_numpy(stack(2).astype(np.int64)) if stack else torch.zeros(n, 0, 0, dtype=torch.long),
                      torch.from_numpy(stack(3)) if stack else torch.zeros(n, 0, dtype=torch.float16))


def _join(pieces: list[tuple[np.ndarray, tuple]]) -> TokenBatch:
    """One batch from rows of up to two shards: each piece batched alone, then padded and joined."""
    if len(pieces) == 1:
        return make_batch(pieces[0][0], *pieces[0][1])
    parts = [make_batch(rows, *data) for rows, data in pieces]
    width = max(p.tokens.shape[1] for p in parts)
    tokens, positions, offset = [], [], 0
    for p in parts:
        b, w = p.tokens.shape
        tokens.append(torch.nn.functional.pad(p.tokens, (0, width - w)))
        positions.append(offset + (p.positions // w) * width + p.positions % w)
        offset += b * width
    return TokenBatch(torch.cat(tokens), torch.cat(positions), *(torch.cat(f) for f in list(zip(*parts))[2:]))


def _next_at(stored, rows: Sequences, picked_rows: np.ndarray) -> torch.Tensor:
    """[N, K] stored next-token log-probs at make_batch's positions (same order: row by row, j rising)."""
    width = int(rows.lengths[picked_rows].max())
    inside = np.arange(1, width)[None, :] < rows.lengths[picked_rows][:, None]
    r, j = np.nonzero(rows.mask[picked_rows, 1:width] & inside)
    src = picked_rows[r]
    return torch.from_numpy(np.stack([values[offsets[src] + j] for offsets, values in stored], axis=1).astype(np.float32))


def student_positions(engine, batch: TokenBatch, vocab: int) -> torch.Tensor:
    """The student's logits [N, V] at the batch's target positions."""
    logits = shared_vocabulary(logits_of(engine(batch.tokens)), vocab, "student.model")
    return logits.reshape(-1, vocab)[batch.positions]



def read_token_split(cfg: Config, uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [R, L] padded, lengths [R], mask [R, L]) of a whole (small) split; shards may differ in width."""
    parts = [read_token_shard(s, cfg.data)[1:] for s in input_shards(uri)]
    width = max(p[0].shape[1] for p in parts)
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731
    return np.concatenate([pad(p[0]) for p in parts]), np.concatenate([p[1] for p in parts]), \
        np.concatenate([pad(p[2]) for p in parts])


@torch.no_grad()
def model_accuracy(model, tokens: np.ndarray, mask: np.ndarray, vocab: int, batch_size: int = 32) -> float | None:
    """Top-1 accuracy of next-token predictions over the target tokens (mask)."""
    hits = total = 0
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size])
        pred = shared_vocabulary(logits_of(model(x)), vocab, "model").argmax(-1)[:, :-1].numpy()
        m = mask[i:i + batch_size, 1:]
        hits += int((pred == tokens[i:i + batch_size, 1:])[m].sum())
        total += int(m.sum())
    return hits / total if total else None


class NextTokenProbabilities(torch.nn.Module):
    """The served student: token ids [B, L] -> softmax at T = 1 over the shared vocabulary, per position."""

    def __init__(self, student: torch.nn.Module, vocab: int):
        super().__init__()
        self.student, self.vocab = student, vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_of(self.student(input_ids))[..., :self.vocab].float(), dim=-1)


# -- the task ------------------------------------------------------------------------------------
class Token(Task):
    name = "token"
    own_keys = ("data.text", "evaluate.prompts", "evaluate.latency_tokens", "store.codec")
    unit = "token"
    implicit_store_info = {"codec": "float16"}  # stores from before store.codec have only this one
    columns = (Column("ppl", "perplexity", ".2f"), Column("NLL/tok", "nll", ".3f"), Column("top-1", "accuracy", "%"),
               Column("fidelity", "fidelity", "%"), Column("KL", "kl", ".3f"), Column("tok/s", "tokens_per_s", ",.0f"))
    headline = "perplexity"

    def check_config(self, cfg: Config) -> None:
        d = cfg.data
        if d.vocab_size is None:
            raise UserError("data.vocab_size: task token needs the shared vocabulary size (e.g. 32000)")
        if cfg.distill.mix_space == "logit":
            raise UserError("distill.mix_space: task token mixes per-teacher top-k targets in probability space; "
                            "use mix_space: prob")
        if d.tokenizer == "teachers" and not any(kind_of(t).tokenizer(t) for t in cfg.teachers):
            raise UserError("data.tokenizer: 'teachers' needs pretrained teachers; give a tokenizer directory or null")
        if (d.text is not None or d.prepare == "pydoc") and d.tokenizer is None:
            raise UserError(f"data.tokenizer: {'data.text' if d.text else 'data.prepare: pydoc'} is real text and "
                            "needs the shared tokenizer; give a tokenizer directory, a .gguf file or 'teachers'")
        if d.text is not None and d.prepare is not None:
            raise UserError("data.prepare: data.text already says where the splits come from; remove one of them")

    def tokenizer(self, cfg: Config) -> str | None:
        return tokenizer_path(cfg)

    def store_info(self, cfg: Config) -> dict[str, Any]:
        return vocabulary(cfg)

    def describe_store(self, manifest: dict[str, Any]) -> str:
        per_token = manifest.get("bytes_per_token")
        return (f"vocabulary {manifest['vocab_size']} (hash {manifest['vocab_hash']}), top-{manifest['top_k']} "
                f"{manifest.get('codec', 'float16')} + tail" + (f", {per_token:.1f} bytes/token" if per_token else ""))

    def decode(self, table: pa.Table) -> TopK:
        return decode(table)

    # -- label -------------------------------------------------------------------------------
    def read_inputs(self, cfg: Config, shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, tokens, lengths, _ = read_token_shard(InputShard.of(shard), cfg.data)
        return ids, tokens, lengths

    @torch.inference_mode()
    def label_shard(self, model, inputs, cfg: Config, teacher, device: str, where: str):
        """The shard's targets. Rows are batched by length (longest first), each batch cut to its own
        longest row, so padding costs little; each batch's logits are reduced to top-k at once (a
        [rows, L, V] block of a 49k vocabulary is 50 MB a row), and the rows keep the input's order.
        Each row's logits go to topk_targets as a view, and NaN is looked for in what is kept, not
        in the logits (a NaN or +inf logit makes every log-prob of its position NaN; a −inf logit is
        a legitimate zero): copying the batch's rows together and checking them took 14% of a
        SmolLM2 label worker's time (py-spy), and removing both took label from 0.80x to 1.00x a
        plain loop's tokens/s (tools/bench_label_lm.py)."""
        ids, tokens, lengths = inputs
        assert cfg.data.vocab_size is not None  # check_config requires it
        vocab, k = cfg.data.vocab_size, min(cfg.store.top_k, cfg.data.vocab_size)
        order = np.argsort(-np.asarray(lengths), kind="stable")
        per_row: list = [None] * len(ids)
        for start in range(0, len(ids), teacher.batch_size):
            rows = order[start:start + teacher.batch_size]
            width = int(lengths[rows].max())
            batch = torch.from_numpy(np.ascontiguousarray(tokens[rows, :width])).to(device)
            try:
                logits = logits_of(model(batch)).float()
            except (RuntimeError, IndexError) as exc:
                raise UserError(f"teacher '{teacher.name}' failed on {where} ({str(exc).splitlines()[0]}); "
                                "check data.vocab_size and the sequence length against the model") from None
            logits = shared_vocabulary(logits, vocab, f"teacher '{teacher.name}'")
            for r, row in enumerate(rows):              # a row's logits: a view on the device, not a copy
                n = lengths[row] - 1                    # position j predicts token j + 1
                per_row[row] = topk_targets(logits[r, :n], k, following=batch[r, 1:n + 1])
        logp, idx, tail, nxt = (np.concatenate(part) for part in zip(*per_row))
        if np.isnan(logp[:, 0]).any() or np.isnan(nxt).any():  # NaN or +inf logits make every log-prob NaN
            raise UserError(f"teacher '{teacher.name}' produced NaN/Inf logits on {where}; fix the teacher or "
                            "its checkpoint")
        data, entry = encode(ids, lengths - 1, logp, idx, tail, level=cfg.store.compression_level, nxt=nxt,
                             codec=cfg.store.codec)
        return data, {**entry, "num_classes": vocab, "dtype": "float16"}

    def stored_accuracy(self, cfg: Config, store: Store, split: str, teacher: str) -> float | None:
        """Top-1 next-token accuracy from the stored targets (each position's first top-k id)."""
        hits = total = 0
        for shard in range(len(store.inputs(split))):
            rows = self.read_rows(cfg, store, split, shard, [teacher])
            offsets, _, idx, _ = rows.targets[0]
            r, j = np.nonzero(rows.mask[:, 1:])
            hits += int((idx[offsets[r] + j, 0] == rows.tokens[r, j + 1]).sum())
            total += len(r)
        return hits / total if total else None

    # -- fit a teacher -------------------------------------------------------------------------
    def fit(self, model, cfg: Config, teacher) -> None:
        """Next-token cross-entropy on the train split's target tokens (lm.fit_lm)."""
        tokens, _, mask = read_token_split(cfg, cfg.data.train)
        f = teacher.fit
        fit_lm(model, tokens, epochs=f.epochs, lr=f.lr, batch_size=f.batch_size, seed=f.seed,
               weight_decay=f.weight_decay, mask=mask)

    def accuracy(self, model, cfg: Config, split: str) -> float | None:
        tokens, _, mask = read_token_split(cfg, getattr(cfg.data, split))
        assert cfg.data.vocab_size is not None  # check_config requires it
        return model_accuracy(model, tokens, mask, cfg.data.vocab_size)

    # -- distill -------------------------------------------------------------------------------
    def check_inputs(self, cfg: Config, shards: list[InputShard], num_classes: int | None) -> None:
        check_columns(shards, {"data.features": cfg.data.features})

    def preflight(self, cfg: Config, store: Store, student) -> None:
        """The store holds this vocabulary; the student runs on a validation sequence and covers it."""
        store.check_task(self.name, vocabulary(cfg), self.implicit_store_info)
        _, tokens, lengths, _ = read_token_shard(InputShard.of(store.inputs("val")[0]), cfg.data)
        out = logits_of(run_on(student, torch.from_numpy(tokens[:1, :lengths[0]])))
        assert cfg.data.vocab_size is not None  # check_config requires it
        shared_vocabulary(out, cfg.data.vocab_size, "student.model")

    def read_rows(self, cfg: Config, store: Store, split: str, shard: int, teachers: list[str]) -> Sequences:
        """One input shard and its teachers' targets, aligned by id and length."""
        ids, tokens, lengths, mask = read_token_shard(InputShard.of(store.inputs(split)[shard]), cfg.data)
        found = read_aligned(store, split, shard, teachers, decode, ids,
                             same=lambda t: np.array_equal(t.lengths, lengths - 1))
        targets = [(np.concatenate([[0], np.cumsum(t.lengths)]), t.logp, t.idx, t.tail) for t in found]
        return Sequences(tokens, lengths, mask, targets)

    def batches(self, cfg: Config, store: Store, split: str, teachers: list[str], segments, batch_size: int,
                rng) -> Iterator[TokenBatch]:
        """Micro-batches of batch_size sequences (row_batches: a short rest carried into the next shard)."""
        for pieces in row_batches(segments, lambda s: self.read_rows(cfg, store, split, s, teachers), batch_size, rng):
            yield _join([(rows, data) for data, rows in pieces])

    def train_step(self, engine, batch: TokenBatch, strategy, cfg: Config, epoch: int):
        """(KDLoss, per-token teacher weights [N, K], N): the loss of one micro-batch, not yet stepped."""
        assert cfg.data.vocab_size is not None  # check_config requires it
        vocab, dc, device = cfg.data.vocab_size, cfg.distill, engine.device
        batch = TokenBatch(*(t.to(device) for t in batch))
        buckets, bucket_labels = rule_inputs(batch.logp, batch.idx, batch.tail, batch.labels, vocab)
        weights = strategy.weights(buckets, bucket_labels, dc.temperature, epoch)
        z = student_positions(engine, batch, vocab)
        out = token_loss(z, batch.labels, batch.logp, batch.idx, batch.tail, vocab, dc.temperature, dc.alpha, weights,
                         divergence=divergence(dc))
        return out, weights, len(batch.labels)

    def count_correct(self, engine, batch: TokenBatch, cfg: Config) -> tuple[int, int]:
        batch = TokenBatch(*(t.to(engine.device) for t in batch))
        assert cfg.data.vocab_size is not None  # check_config requires it
        pred = student_positions(engine, batch, cfg.data.vocab_size).argmax(-1)
        return int((pred == batch.labels).sum()), len(batch.labels)

    # -- evaluate and serve --------------------------------------------------------------------
    @torch.inference_mode()
    def quality(self, cfg: Config, store: Store, teachers: list[str], others: list[str], student, strategy):
        """Over every target token of the test split. Teachers are judged from their stored targets
        (top-1 = their first top-k id; NLL from the stored log-prob of the next token, or, in a store
        without it, from the reconstructed distribution), the ensemble is their reconstructed
        distributions (topk.dense_from_topk: the tail spread evenly) mixed with the configured rule
        at T = 1 (its NLL: the rule's mix of the exact next-token probabilities), the student is run
        here. KL is per token; ECE is not computed. Tokens are taken in chunks so that the dense
        [tokens, teachers, V] reconstruction stays near 64 MB whatever V."""
        assert cfg.data.vocab_size is not None  # check_config requires it
        names, vocab = [*teachers, *others], cfg.data.vocab_size
        # per model: correct, agrees with the ensemble, KL sum, NLL sum
        stats = torch.zeros(len(names) + 2, 4, dtype=torch.float64)
        total, k_ens = 0, len(teachers)
        chunk = max(1, (16 << 20) // (len(names) * vocab))
        for shard in range(len(store.inputs("test"))):
            rows = self.read_rows(cfg, store, "test", shard, names)
            stored_next = self._stored_next(store, shard, names)
            order = np.arange(len(rows.tokens))
            for start in range(0, len(order), 32):
                batch = make_batch(order[start:start + 32], *rows)
                if not len(batch.labels):
                    continue
                log_student = torch.log_softmax(student_positions(student, batch, vocab).float(), -1)
                picked = None if stored_next is None else _next_at(stored_next, rows, order[start:start + 32])
                for a in range(0, len(batch.labels), chunk):
                    part = slice(a, a + chunk)
                    stats += self._chunk_stats(batch, part, log_student[part], None if picked is None else picked[part],
                                               names, k_ens, vocab, strategy)
                total += len(batch.labels)
        out = {}
        for m, name in enumerate([*names, "ensemble", "student"]):
            correct, agree, kl, nll = (stats[m] / max(total, 1)).tolist()
            out[name] = {"accuracy": correct, "fidelity": agree, "kl": kl, "ece": None, "nll": nll,
                         "perplexity": float(np.exp(nll))}
        return out, total

    def _stored_next(self, store: Store, shard: int, names: list[str]):
        """Each model's stored next-token log-probs of a test shard (offsets, values), or None if any lacks them."""
        found = [decode(store.read_table("test", name, shard)) for name in names]
        if any(t.next is None for t in found):
            return None
        return [(np.concatenate([[0], np.cumsum(t.lengths)]), t.next) for t in found]

    @staticmethod
    def _chunk_stats(batch: TokenBatch, part: slice, log_s: torch.Tensor, picked, names, k_ens: int, vocab: int,
                     strategy) -> torch.Tensor:
        labels = batch.labels[part]
        dense = torch.stack([dense_from_topk(batch.logp[part, k], batch.idx[part, k], batch.tail[part, k], vocab)
                             for k in range(len(names))], dim=1)                                     # [c, K, V]
        w = strategy.weights(*rule_inputs(batch.logp[part, :k_ens], batch.idx[part, :k_ens], batch.tail[part, :k_ens],
                                          torch.full_like(labels, -100), vocab), 1.0)
        p_ens = (w.unsqueeze(-1) * dense[:, :k_ens]).sum(1)
        log_models = [*(dense[:, k].clamp_min(1e-30).log() for k in range(len(names))), p_ens.clamp_min(1e-30).log(),
                      log_s]
        at_label = [lp.gather(-1, labels[:, None]).squeeze(-1) for lp in log_models]
        if picked is not None:  # exact: the stored log p of the next token, mixed as the ensemble mixes
            at_label[:len(names)] = list(picked.T)
            at_label[len(names)] = (w * picked[:, :k_ens].exp()).sum(-1).clamp_min(1e-30).log()
        top_ens = p_ens.argmax(-1)
        stats = torch.zeros(len(log_models), 4, dtype=torch.float64)
        for m, log_p in enumerate(log_models):
            top = log_p.argmax(-1)
            kl = (p_ens * (p_ens.clamp_min(1e-30).log() - log_p)).sum(-1)
            stats[m] = torch.tensor([(top == labels).sum().item(), (top == top_ens).sum().item(), kl.sum().item(),
                                     -at_label[m].double().sum().item()])
        return stats

    def latency_inputs(self, cfg: Config) -> tuple[torch.Tensor, str | None]:
        x = torch.from_numpy(read_token_split(cfg, cfg.data.test)[0])[:, :cfg.evaluate.latency_tokens]
        return x, f"sequences of {x.shape[1]} tokens"

    def throughput(self, x: torch.Tensor, batch: int, seconds: float) -> dict[str, float]:
        return {"tokens_per_s": batch * x.shape[1] / seconds}

    def summary(self, ensemble: dict[str, Any], student: dict[str, Any]) -> tuple[dict[str, float | None], str | None]:
        retained = ensemble["perplexity"] / student["perplexity"]
        return ({"perplexity_retained": retained},
                f"keeps {100 * retained:.1f}% of its perplexity (ensemble ppl / student ppl)")

    @torch.inference_mode()
    def continuations(self, cfg: Config, scorers) -> list[dict]:
        """Greedy: each step appends the model's most likely next token (the full prefix is run
        again: no cache, as every model here is scored the same way); stops at the tokenizer's
        end-of-sequence token."""
        from ensemblekd.lm import load_tokenizer

        path = tokenizer_path(cfg)
        if path is None:
            return []
        tokenizer, out = load_tokenizer(path), []
        vocab, eos = cfg.data.vocab_size, tokenizer.eos_token_id
        for prompt in cfg.evaluate.prompts:
            start = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for name, score in scorers.items():
                seq = list(start)
                for _ in range(cfg.evaluate.max_new_tokens):
                    following = int(score(torch.tensor([seq]))[0, -1, :vocab].argmax())
                    if following == eos:
                        break
                    seq.append(following)
                out.append({"prompt": prompt, "model": name, "text": tokenizer.decode(seq[len(start):])})
        return out

    def logits(self, model, x: torch.Tensor, cfg: Config) -> torch.Tensor:
        assert cfg.data.vocab_size is not None  # check_config requires it
        return shared_vocabulary(logits_of(model(x)), cfg.data.vocab_size, "teacher")

    def served(self, cfg: Config, student) -> Served:
        """Token ids int64 [-1, -1] -> next-token probabilities float32 [-1, -1, V] at every position;
        4 validation sequences cut to a common length as the example. No TorchScript copy: a trace
        fixes the shapes of a Hugging Face LM."""
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        tokens, lengths, _ = read_token_split(cfg, cfg.data.val)
        n = min(4, len(tokens))
        example = tokens[:n, :int(lengths[:n].min())].copy()
        assert cfg.data.vocab_size is not None  # check_config requires it
        signature = ModelSignature(Schema([TensorSpec(np.dtype("int64"), (-1, -1))]),
                                   Schema([TensorSpec(np.dtype("float32"), (-1, -1, cfg.data.vocab_size))]))
        return Served(NextTokenProbabilities(student, cfg.data.vocab_size).eval(), example, signature, torchscript=False)
