"""task: token — the causal-LM side of label, distill and evaluate.

Rows are sequences of token ids. A teacher's logits at position j predict token j + 1, so a
sequence of L tokens gives L − 1 stored positions: per position the top-k log-probs of the full
softmax, their ids and the tail mass (ensemblekd.tokens). The student trains on every position
whose next token is a target (data.loss_mask, padding excluded) with tokens.token_loss; the
strategy's per-token teacher weights come from the same rules as for classification, fed the
sparse targets through tokens.rule_inputs. Teachers, student and the store share one vocabulary
(data.vocab_size) and its tokenizer hash (ensemblekd.lm.vocab_hash), recorded in the manifest.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ensemblekd.config import Config
from ensemblekd.data import InputShard, read_token_shard
from ensemblekd.errors import UserError
from ensemblekd.lm import logits_of
from ensemblekd.store import Store
from ensemblekd.tokens import (
    decode_token_shard,
    encode_token_shard,
    rule_inputs,
    token_loss,
    topk_targets,
)


def vocabulary(cfg: Config) -> dict[str, Any]:
    """The manifest's record of the shared vocabulary: size and tokenizer hash.

    data.tokenizer names a local tokenizer directory, or 'teachers': each pretrained teacher's
    own, which must all agree. Without one the ids are synthetic and the hash says so.
    """
    from ensemblekd.lm import vocab_hash

    d = cfg.data
    if d.tokenizer == "teachers":
        hashes = {t.name: vocab_hash(t.pretrained) for t in cfg.teachers if t.pretrained}
        if len(set(hashes.values())) > 1:
            raise UserError(f"teachers.pretrained: the teachers' tokenizers differ (vocabulary hashes {hashes}); "
                            "token-level distillation needs one shared tokenizer")
        digest = next(iter(hashes.values()))
    else:
        digest = vocab_hash(d.tokenizer if d.tokenizer else d.vocab_size)
    for t in cfg.teachers:
        if t.pretrained and d.tokenizer and d.tokenizer != "teachers" and vocab_hash(t.pretrained) != digest:
            raise UserError(f"teacher '{t.name}': its tokenizer (hash {vocab_hash(t.pretrained)}) is not "
                            f"data.tokenizer's (hash {digest}); all teachers and the student must share one")
    return {"vocab_size": d.vocab_size, "vocab_hash": digest, "top_k": min(cfg.store.top_k, d.vocab_size)}


# -- label -------------------------------------------------------------------------------------
def read_inputs(cfg: Config, shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, tokens, lengths, _ = read_token_shard(InputShard(**shard), cfg.data)
    return ids, tokens, lengths


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


@torch.inference_mode()
def label_shard(model, inputs, cfg: Config, teacher, device: str, where: str) -> dict[str, Any]:
    """One teacher over one input shard -> the encoded top-k shard, written by the caller."""
    ids, tokens, lengths = inputs
    vocab, k = cfg.data.vocab_size, min(cfg.store.top_k, cfg.data.vocab_size)
    parts = []
    for start in range(0, len(ids), teacher.batch_size):
        batch = torch.from_numpy(np.array(tokens[start:start + teacher.batch_size])).to(device)  # a writable copy
        try:
            logits = logits_of(model(batch)).float()
        except (RuntimeError, IndexError) as exc:
            raise UserError(f"teacher '{teacher.name}' failed on {where} ({str(exc).splitlines()[0]}); "
                            "check data.vocab_size and the sequence length against the model") from None
        logits = shared_vocabulary(logits, vocab, f"teacher '{teacher.name}'")
        keep = [logits[r, :lengths[start + r] - 1] for r in range(len(batch))]  # position j predicts token j + 1
        flat = torch.cat(keep).cpu()
        if not torch.isfinite(flat).all():
            raise UserError(f"teacher '{teacher.name}' produced NaN/Inf logits on {where}; fix the teacher or its checkpoint")
        parts.append(topk_targets(flat, k))
    logp, idx, tail = (np.concatenate(p) for p in zip(*parts))
    data, entry = encode_token_shard(ids, lengths - 1, logp, idx, tail, level=cfg.store.compression_level)
    return data, {**entry, "num_classes": vocab, "dtype": "float16"}


# -- distill -----------------------------------------------------------------------------------
class TokenBatch(NamedTuple):
    """A micro-batch of sequences and the N target positions in it."""

    tokens: torch.Tensor        # [B, L] long, right-padded
    positions: torch.Tensor     # [N] flat index into the student's [B * L] positions
    labels: torch.Tensor        # [N] the next token at each position
    logp: torch.Tensor          # [N, K, k] teachers' top-k log-probs (float16)
    idx: torch.Tensor           # [N, K, k]
    tail: torch.Tensor          # [N, K] log tail mass (float16)


def read_rows(cfg: Config, store: Store, split: str, shard: int, teachers: list[str]):
    """(tokens [R, L], lengths [R], mask [R, L], per teacher (offsets [R + 1], logp, idx, tail))."""
    ids, tokens, lengths, mask = read_token_shard(InputShard(**store.inputs(split)[shard]), cfg.data)
    targets = []
    for name in teachers:
        t_ids, t_len, logp, idx, tail = decode_token_shard(store.read_bytes(split, name, shard))
        if not np.array_equal(t_ids, ids) or not np.array_equal(t_len, lengths - 1):
            raise UserError(f"{store.uri}: {split} shard {shard} of teacher '{name}' is not aligned with its input "
                            "(ids or lengths differ); the input changed since labelling: re-run label")
        targets.append((np.concatenate([[0], np.cumsum(t_len)]), logp, idx, tail))
    return tokens, lengths, mask, targets


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


def iter_batches(cfg: Config, store: Store, split: str, teachers: list[str], segments, batch_size: int,
                 rng: np.random.Generator | None) -> Iterator[TokenBatch]:
    """Micro-batches of batch_size sequences over the worker's segments (a short last batch per
    shard is carried into the next one, as distill.iter_batches does for rows)."""
    pending: list[tuple[np.ndarray, tuple]] = []
    count = 0
    for shard, start, stop in segments:
        data = read_rows(cfg, store, split, shard, teachers)
        rows = np.arange(start, stop)
        if rng is not None:
            rows = rng.permutation(rows)
        pos = 0
        while pos < len(rows):
            take = rows[pos:pos + batch_size - count]
            pos += len(take)
            pending.append((take, data))
            count += len(take)
            if count == batch_size:
                yield _join(pending)
                pending, count = [], 0
    if pending:
        yield _join(pending)


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


def student_positions(engine, batch: TokenBatch, vocab: int) -> torch.Tensor:
    """The student's logits [N, V] at the batch's target positions."""
    logits = shared_vocabulary(logits_of(engine(batch.tokens)), vocab, "student.model")
    return logits.reshape(-1, vocab)[batch.positions]


def train_step(engine, batch: TokenBatch, strategy, cfg: Config, epoch: int):
    """(KDLoss, per-token teacher weights [N, K], N): the loss of one micro-batch, not yet stepped."""
    vocab, dc, device = cfg.data.vocab_size, cfg.distill, engine.device
    batch = TokenBatch(*(t.to(device) for t in batch))
    buckets, bucket_labels = rule_inputs(batch.logp, batch.idx, batch.tail, batch.labels, vocab)
    weights = strategy.weights(buckets, bucket_labels, dc.temperature, epoch)
    z = student_positions(engine, batch, vocab)
    out = token_loss(z, batch.labels, batch.logp, batch.idx, batch.tail, vocab, dc.temperature, dc.alpha, weights)
    return out, weights, len(batch.labels)


@torch.no_grad()
def next_token_counts(cfg: Config, store: Store, engine, split: str, segments, micro: int, steps: int) -> torch.Tensor:
    """[correct, targets] of the student's top-1 next token over its segments; `steps` forwards
    on every worker (padding with a one-token batch), since a ZeRO-3 forward is a collective."""
    counts = torch.zeros(2, dtype=torch.float64)
    batches = iter_batches(cfg, store, split, [], segments, micro, None)
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:
            engine(torch.zeros(1, 1, dtype=torch.long, device=engine.device))
            continue
        batch = TokenBatch(*(t.to(engine.device) for t in batch))
        pred = student_positions(engine, batch, cfg.data.vocab_size).argmax(-1)
        counts += torch.tensor([(pred == batch.labels).sum().item(), len(batch.labels)], dtype=torch.float64)
    return counts


def preflight(cfg: Config, store: Store) -> None:
    """The student builds, runs on a validation sequence and covers the stored vocabulary."""
    from ensemblekd.teachers import build_model

    expected = vocabulary(cfg)
    for key in ("vocab_size", "vocab_hash", "top_k"):
        if store.m.get(key) != expected[key]:
            raise UserError(f"{store.uri}: labelled with {key} {store.m.get(key)}, the config gives {expected[key]}; "
                            "re-run label into a new store.uri")
    model = build_model(cfg.student.model, cfg.student.kwargs, "student.model")
    _, tokens, lengths, _ = read_token_shard(InputShard(**store.inputs("val")[0]), cfg.data)
    try:
        with torch.no_grad():
            out = logits_of(model(torch.from_numpy(tokens[:1, :lengths[0]])))
    except (RuntimeError, IndexError) as exc:
        raise UserError(f"student.model: fails on the data ({str(exc).splitlines()[0]}); check its kwargs") from None
    shared_vocabulary(out, cfg.data.vocab_size, "student.model")


def steps_for(rows: list[int], world: int, micro: int) -> int:
    return math.ceil(max(1, math.ceil(sum(rows) / world)) / micro)


# -- fit and accuracy --------------------------------------------------------------------------
def read_token_split(cfg: Config, uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [R, L] padded, lengths [R], mask [R, L]) of a whole (small) split; shards may differ in width."""
    from ensemblekd.data import input_shards

    parts = [read_token_shard(s, cfg.data)[1:] for s in input_shards(uri)]
    width = max(p[0].shape[1] for p in parts)
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))
    return np.concatenate([pad(p[0]) for p in parts]), np.concatenate([p[1] for p in parts]), \
        np.concatenate([pad(p[2]) for p in parts])


@torch.no_grad()
def model_accuracy(model, tokens: np.ndarray, mask: np.ndarray, vocab: int, batch_size: int = 32) -> float | None:
    """Top-1 next-token accuracy over the target tokens (mask)."""
    hits = total = 0
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size])
        pred = shared_vocabulary(logits_of(model(x)), vocab, "model").argmax(-1)[:, :-1].numpy()
        m = mask[i:i + batch_size, 1:]
        hits += int((pred == tokens[i:i + batch_size, 1:])[m].sum())
        total += int(m.sum())
    return hits / total if total else None


def fit_token_teacher(cfg: Config, t) -> tuple[torch.nn.Module, float | None]:
    """A teacher's fit block for task token: next-token cross-entropy on the train split
    (ensemblekd.lm.fit_lm), then its validation accuracy."""
    from ensemblekd.lm import fit_lm
    from ensemblekd.teachers import build_model

    tokens, _, _ = read_token_split(cfg, cfg.data.train)
    model = build_model(t.model, t.kwargs, f"teacher '{t.name}'.model")
    fit_lm(model, tokens, epochs=t.fit.epochs, lr=t.fit.lr, batch_size=t.fit.batch_size, seed=t.fit.seed,
           weight_decay=t.fit.weight_decay)
    val_tokens, _, val_mask = read_token_split(cfg, cfg.data.val)
    return model, model_accuracy(model, val_tokens, val_mask, cfg.data.vocab_size)


def stored_accuracy(cfg: Config, store: Store, split: str, teacher: str) -> float | None:
    """A teacher's top-1 next-token accuracy from its stored targets (its first top-k id)."""
    hits = total = 0
    for shard in range(len(store.inputs(split))):
        tokens, lengths, mask, [(offsets, _, idx, _)] = read_rows(cfg, store, split, shard, [teacher])
        r, j = np.nonzero(mask[:, 1:])
        hits += int((idx[offsets[r] + j, 0] == tokens[r, j + 1]).sum())
        total += len(r)
    return hits / total if total else None


class _NextTokenProbabilities(torch.nn.Module):
    """The served student: token ids [B, L] -> softmax at T = 1 over the shared vocabulary, per position."""

    def __init__(self, student: torch.nn.Module, vocab: int):
        super().__init__()
        self.student, self.vocab = student, vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_of(self.student(input_ids))[..., :self.vocab].float(), dim=-1)


def serving_model(cfg: Config, student: torch.nn.Module) -> tuple[torch.nn.Module, np.ndarray]:
    """(the served student, an input example: 4 validation sequences cut to a common length)."""
    tokens, lengths, _ = read_token_split(cfg, cfg.data.val)
    n = min(4, len(tokens))
    return _NextTokenProbabilities(student, cfg.data.vocab_size).eval(), tokens[:n, :int(lengths[:n].min())].copy()


# -- evaluate ----------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(cfg: Config, student_uri: str, warmup: int = 20, repeats: int = 200) -> dict[str, Any]:
    """evaluate.evaluate for task token, over every target token of the test split.

    Teachers are judged from their stored targets (top-1 = their first top-k id), the ensemble is
    their reconstructed distributions (tokens.dense_from_topk: the tail spread evenly) mixed with
    the configured rule at T = 1, the student is run here. Fidelity = top-1 agreement with the
    ensemble, KL = mean KL(ensemble || model) in nats per token; ECE is not computed. Latency is
    per batch of 1 and 64 test sequences.
    """
    from ensemblekd import storage
    from ensemblekd.distill import strategy_for
    from ensemblekd.evaluate import (
        LATENCY_BATCHES,
        measure_latency,
        one_thread,
        summarise,
    )
    from ensemblekd.models import count_parameters
    from ensemblekd.teachers import build_model, load_state, load_teacher
    from ensemblekd.tokens import dense_from_topk

    names, vocab = [t.name for t in cfg.teachers], cfg.data.vocab_size
    store = Store.open(cfg.store.uri)
    store.check_complete("test", names)
    strategy = strategy_for(cfg, store, ensemble=True)
    student = load_state(build_model(cfg.student.model, cfg.student.kwargs, "student.model"), student_uri, "student")
    stats = torch.zeros(len(names) + 2, 3, dtype=torch.float64)  # per model: correct, agrees with ensemble, KL sum
    total = 0
    for shard in range(len(store.inputs("test"))):
        tokens, lengths, mask, targets = read_rows(cfg, store, "test", shard, names)
        rows = np.arange(len(tokens))
        for start in range(0, len(rows), 32):
            batch = make_batch(rows[start:start + 32], tokens, lengths, mask, targets)
            if not len(batch.labels):
                continue
            dense = torch.stack([dense_from_topk(batch.logp[:, k], batch.idx[:, k], batch.tail[:, k], vocab)
                                 for k in range(len(names))], dim=1)                                  # [N, K, V]
            w = strategy.weights(*rule_inputs(batch.logp, batch.idx, batch.tail, torch.full_like(batch.labels, -100), vocab),
                                 1.0)
            p_ens = (w.unsqueeze(-1) * dense).sum(1)
            log_s = torch.log_softmax(student_positions(student, batch, vocab).float(), -1)
            log_models = [*(dense[:, k].clamp_min(1e-30).log() for k in range(len(names))), p_ens.clamp_min(1e-30).log(), log_s]
            top_ens = p_ens.argmax(-1)
            for m, log_p in enumerate(log_models):
                top = log_p.argmax(-1)
                kl = (p_ens * (p_ens.clamp_min(1e-30).log() - log_p)).sum(-1)
                stats[m] += torch.tensor([(top == batch.labels).sum().item(), (top == top_ens).sum().item(), kl.sum().item()])
            total += len(batch.labels)
    teachers = [load_teacher(cfg, t) for t in cfg.teachers]
    modules = [*teachers, None, student]
    files = [t.pretrained or cfg.teacher_checkpoint(t) for t in cfg.teachers]
    rows_out = []
    for m, (name, role) in enumerate([*((n, "teacher") for n in names), ("ensemble", "ensemble"), ("student", "student")]):
        correct, agree, kl = (stats[m] / max(total, 1)).tolist()
        if role == "ensemble":
            params, size = sum(r["params"] for r in rows_out), sum(r["bytes"] for r in rows_out)
        else:
            params = count_parameters(modules[m])
            size = storage.file_size(student_uri if role == "student" else files[m]) if role == "student" or not cfg.teachers[m].pretrained \
                else sum(os.path.getsize(os.path.join(files[m], f)) for f in os.listdir(files[m]))
        rows_out.append({"model": name, "role": role, "accuracy": correct, "fidelity": agree, "kl": kl, "ece": None,
                         "params": params, "bytes": size})

    def ensemble_forward(x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([shared_vocabulary(logits_of(t(x)), vocab, "teacher") for t in teachers], dim=-2)
        return strategy.targets(z.reshape(-1, *z.shape[-2:]).float(), None, 1.0)[0]

    x = torch.from_numpy(read_token_split(cfg, cfg.data.test)[0])
    with one_thread():
        for row, forward in zip(rows_out, [*teachers, ensemble_forward, student]):
            for b in LATENCY_BATCHES:
                p50, p99 = measure_latency(forward, x, b, warmup, repeats) if repeats else (None, None)
                row.update({f"p50_ms_b{b}": p50, f"p99_ms_b{b}": p99})
    latency = {"threads": 1, "warmup": warmup, "repeats": repeats, "batches": list(LATENCY_BATCHES),
               "unit": f"sequences of {x.shape[1]} tokens"}
    return {"rows": rows_out, "test_rows": total, "summary": summarise(rows_out), "latency": latency}
