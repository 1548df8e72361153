#!/usr/bin/env python3
"""Token-level soft targets from a real pretrained LM: what the top-k store costs, and what it
costs the student.

The teacher is SmolLM2-135M-Instruct (the built-in GGUF file, ensemblekd.lm.builtin_gguf), the
text CPython's pydoc topics (ensemblekd.data.text.prepare_pydoc, 256-token rows, split by topic).
bench_lm_store.py measures the store on tiny synthetic teachers, far less peaked than a real LM;
this measures it on a real one, and adds the figure that matters: the student's perplexity.

  1. teacher   SmolLM2 runs once over a seeded subset of the train split's full-length rows and
               over the whole test split, a few rows at a time (never more than ~1k tokens of
               float32 logits); the train subset's full log-probs are kept as float16 for the
               dense (full-distribution) student, the test split gives the teacher's perplexity.
  2. store     per k in (8, 32, 128) on the train subset: bytes/token of tasks.token.encode (the
               shard codec, the whole Parquet file over its tokens), mass kept (mean, p5) and
               KL(full || stored), stored = topk.dense_from_topk (top-k in place, the tail spread
               evenly) renormalised: the definitions of bench_lm_store.py. Then candidate encoders
               (below), the same way, and a mass-adaptive top-p format against fixed k.
  3. students  one tiny GPT-2, same init, seed, batches, epochs and lr, distilled (alpha = 0,
               T = 1) from top-8, top-32, top-128 (topk.token_loss) and from the full distribution
               (a dense KL on the float16 log-probs), plus trained on the next tokens alone
               (alpha = 1); perplexity = exp(mean NLL) over the test split's target tokens.

Candidate encoders (this file only; Parquet written with the token codec's own writer options:
zstd, no dictionary, byte-stream split on every value column):

  current      tasks.token.encode: log p float16 descending, their ids (uint16) in that order.
  sorted-f16   the same columns, but per token the ids sorted ascending and delta-coded (the first
               id, then the gaps, uint16) and log p permuted alongside. Lossless: decode = cumsum,
               then re-sort by log p descending.
  sorted-u8    sorted-f16 with log p quantised to uint8 codes c = clip(round(−16 log p), 0, 255)
               (steps of 1/16 nat, |error| ≤ 1/32 nat, clamped at −15.94 nats); the tail float16.
  desc-u8      ids in log-p order (uint16, as current), codes delta-coded along that order
               (c_0, then c_i − c_{i−1} ≥ 0, uint8).
  ranked       store.codec: ranked (tasks.token.encode): ids replaced by their rank in the shard's id
               frequency (the ids by decreasing count, zstd, in the file's key-value metadata), sorted
               ascending and delta-coded; log p companded to uint8 codes: the nearest of 256 levels of
               −log p whose step doubles every 4 nats (1/16 nat to 4 nats, 1/8 to 8, 1/4 to 12, then
               1/2 to 83.5); decoded top-k + tail renormalised to 1. One more student learns from it.
  top-p        sorted-u8 with a variable k per token: ids kept, most likely first, until their
               mass reaches p or K_MAX ids; per row a list<uint8> of counts and the flat ids and
               codes of its tokens.

Writes OUT/lm_real.md (the tables) and OUT/lm_real.json (settings, machine, every figure).

    python tools/bench_lm_real.py                        # the full run (see lm_real.md for its time)
    python tools/bench_lm_real.py --quick --out /tmp/lm  # smoke test (< 2 min): it runs, its numbers mean nothing

Internals measured directly:
  ensemblekd.topk: the top-k targets, their reconstruction and the students' top-k loss are what is measured
  ensemblekd.tasks.token: the token shard codec (encode, decode, its Parquet options), measured
  ensemblekd.store: the store's own Parquet pack / unpack, under the codec and the candidate encoders
  ensemblekd.lm: the teacher (builtin_gguf, from_gguf), the students (tiny_gpt2) and logits_of
  ensemblekd.data.text: pydoc rows in SmolLM2's tokenizer (prepare_pydoc); testing.tiny_data writes no such text
  ensemblekd.fitting: every student is fitted by the same seeded loop (fit_module) on its own targets
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

KS = (8, 32, 128)                      # the store's k, each distilled
FRONTIER_KS = (8, 16, 32, 64, 128)     # fixed k for the equal-bytes comparison with top-p
TOP_PS = (0.9, 0.95, 0.99)
K_MAX = 128                            # top-p keeps at most this many ids (and at least 1)
CODES_PER_NAT = 16                     # uint8 log-prob codes: steps of 1/16 nat
BYTE_GOALS = {128: 150.0, 32: 60.0}    # B/token at k
PPL_GOAL = 0.02                        # top-32 student's perplexity within 2% of the full-distribution one
CANDIDATES = ("current", "sorted-f16", "sorted-u8", "desc-u8", "ranked")
QUICK_NOTE = " (a --quick smoke run: a few rows, students barely trained, the figures mean nothing)"


@dataclass
class Sizes:
    train_rows: int          # full-length (256-token) train rows the teacher labels and students learn from
    test_rows: int | None    # test rows (None: all)
    chunk_rows: int          # rows per teacher forward: 4 × 256 tokens of float32 logits = 200 MB
    epochs: int
    batch_size: int
    lr: float
    n_layer: int
    n_embd: int
    n_head: int


FULL = Sizes(train_rows=64, test_rows=None, chunk_rows=4, epochs=2, batch_size=2, lr=1e-2, n_layer=2, n_embd=64, n_head=2)
QUICK = Sizes(train_rows=2, test_rows=2, chunk_rows=4, epochs=1, batch_size=2, lr=1e-2, n_layer=1, n_embd=64, n_head=2)


def log(msg: str) -> None:
    print(f"[bench_lm_real {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data and teacher ----------------------------------------------------------------------------
def read_split(path: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(token rows, loss-mask rows) of one prepared split, in id order."""
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(glob.glob(os.path.join(path, "*.parquet")))).sort_by("id")
    tokens = [np.asarray(r, np.int64) for r in table["tokens"].to_pylist()]
    masks = [np.asarray(r, bool) for r in table["loss_mask"].to_pylist()]
    return tokens, masks


def target_positions(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Per row, the positions j whose next token j + 1 is a target (the loss mask; the first token never is)."""
    return [np.nonzero(m[1:])[0] for m in masks]


def padded(rows: list[np.ndarray]) -> Any:
    """[B, max L] long, right-padded with 0: safe for a causal LM, padding is never read as a target."""
    import torch

    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.from_numpy(r)
    return out


def target_logits(model, tokens: list[np.ndarray], positions: list[np.ndarray], chunk_rows: int):
    """(float32 logits [n, V] at the target positions, next tokens [n]) a few rows at a time."""
    import torch

    from ensemblekd.lm import logits_of

    with torch.no_grad():
        for a in range(0, len(tokens), chunk_rows):
            rows, pos = tokens[a:a + chunk_rows], positions[a:a + chunk_rows]
            logits = logits_of(model(padded(rows)))
            z = torch.cat([logits[i, p] for i, p in enumerate(pos)]).float()
            nxt = torch.from_numpy(np.concatenate([r[p + 1] for r, p in zip(rows, pos)]))
            del logits
            yield z, nxt


def kl_to(lp, q):
    """KL(p || q / Σ q) per token, p = exp(lp) the full float32 distribution; 0 · log 0 = 0."""
    import torch

    log_q = (q / q.sum(-1, keepdim=True)).log()
    p = lp.exp()
    return torch.where(p > 0, p * (lp - log_q), 0.0).sum(-1)


def quantise(logp: np.ndarray) -> np.ndarray:
    """uint8 codes of log-probs: round(−CODES_PER_NAT · log p), clamped to 0..255."""
    return np.clip(np.rint(-CODES_PER_NAT * logp.astype(np.float32)), 0, 255).astype(np.uint8)


def dequantise(codes: np.ndarray) -> np.ndarray:
    return -codes.astype(np.float32) / CODES_PER_NAT


def ranked(logp, idx, tail) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What store.codec: ranked gives back for these targets (one shard)."""
    from ensemblekd.store import unpack
    from ensemblekd.tasks import token

    back = token.decode(unpack(token.encode(np.arange(1), np.array([len(logp)]), logp, idx, tail, codec="ranked")[0]))
    return back.logp, back.idx, back.tail


def variable_dense(logp, idx, kept, tail, vocab_size: int):
    """dense_from_topk with kept[t] ≤ K ids per token: the first kept[t] entries in place, the
    tail spread evenly over the other V − kept[t] ids (entries past kept[t] are overwritten by
    repeating the last kept one, so a single scatter serves every token)."""
    import torch

    lp, ix, n = torch.as_tensor(logp).float(), torch.as_tensor(idx).long(), torch.as_tensor(kept).long()
    col = torch.minimum(torch.arange(lp.shape[1])[None, :], (n - 1)[:, None])
    lp, ix = lp.gather(1, col), ix.gather(1, col)
    fill = torch.as_tensor(tail).float().exp() / (vocab_size - n)
    return fill[:, None].expand(len(lp), vocab_size).clone().scatter_(-1, ix, lp.exp())


def top_p_targets(lp, p_kept: float):
    """(log p float16 [n, K_MAX], ids, kept [n], log tail float16 [n], mass kept [n]) of the ids
    kept until their mass reaches p_kept (at least 1, at most K_MAX); entries past kept are unused."""
    import torch

    val, ix = lp.topk(K_MAX, dim=-1)
    mass = val.exp().cumsum(-1)
    kept = ((mass < p_kept).sum(-1) + 1).clamp(max=K_MAX)
    rest = lp.scatter(-1, ix, -math.inf).logsumexp(-1)                   # beyond the top K_MAX
    beyond = torch.where(torch.arange(K_MAX)[None, :] >= kept[:, None], val, -math.inf)
    tail = torch.logaddexp(rest, beyond.logsumexp(-1))
    return (val.half().numpy(), ix.numpy().astype(np.uint16), kept.numpy().astype(np.uint8),
            tail.half().numpy(), mass.gather(1, (kept - 1)[:, None]).squeeze(1).numpy())


class Collect:
    """What the train-subset pass keeps per token: the targets per k and per p, and per-token figures."""

    def __init__(self) -> None:
        self.topk: dict[int, list] = {k: [] for k in FRONTIER_KS}
        self.top_p: dict[float, list] = {p: [] for p in TOP_PS}
        self.mass: dict[int, list] = {k: [] for k in FRONTIER_KS}
        self.kl: dict[int, list] = {k: [] for k in FRONTIER_KS}
        self.kl_u8: dict[int, list] = {k: [] for k in FRONTIER_KS}
        self.kl_cmp: dict[int, list] = {k: [] for k in KS}
        self.p_mass: dict[float, list] = {p: [] for p in TOP_PS}
        self.p_kl: dict[float, list] = {p: [] for p in TOP_PS}
        self.tail_gap = 0.0

    def add(self, z, vocab_size: int) -> None:
        import torch

        from ensemblekd import topk

        lp = torch.log_softmax(z, dim=-1)
        top = lp.topk(max(FRONTIER_KS), dim=-1).values.exp().cumsum(-1)
        for k in FRONTIER_KS:
            logp, idx, tail = topk.topk_targets(z, k)
            self.topk[k].append((logp, idx, tail))
            self.mass[k].append(top[:, k - 1].numpy())
            self.tail_gap = max(self.tail_gap, float((top[:, k - 1] + torch.from_numpy(tail).float().exp() - 1).abs().max()))
            self.kl[k].append(kl_to(lp, topk.dense_from_topk(logp, idx, tail, vocab_size)).numpy())
            self.kl_u8[k].append(kl_to(lp, topk.dense_from_topk(dequantise(quantise(logp)), idx, tail,
                                                                  vocab_size)).numpy())
            if k in KS:
                self.kl_cmp[k].append(kl_to(lp, topk.dense_from_topk(*ranked(logp, idx, tail), vocab_size)).numpy())
        for p in TOP_PS:
            logp, idx, kept, tail, mass = top_p_targets(lp, p)
            self.top_p[p].append((logp, idx, kept, tail))
            self.p_mass[p].append(mass)
            self.p_kl[p].append(kl_to(lp, variable_dense(dequantise(quantise(logp)), idx, kept, tail,
                                                         vocab_size)).numpy())


def run_teacher(model, train, test, sizes: Sizes, vocab_size: int) -> tuple[Collect, np.ndarray, dict[str, Any]]:
    """One pass over the train subset (store figures, full float16 log-probs) and the test split (perplexity)."""
    import torch

    col = Collect()
    n_train = sum(len(p) for p in train[2])
    full = np.empty((n_train, vocab_size), np.float16)   # the dense student's targets: 98 KB a token
    t0, at = time.perf_counter(), 0
    for z, _ in target_logits(model, train[0], train[2], sizes.chunk_rows):
        full[at:at + len(z)] = torch.log_softmax(z, dim=-1).half().numpy()
        at += len(z)
        col.add(z, vocab_size)
        log(f"teacher: train {at:,}/{n_train:,} tokens")
    train_s = time.perf_counter() - t0
    t0, nll, n = time.perf_counter(), 0.0, 0
    for z, nxt in target_logits(model, test[0], test[2], sizes.chunk_rows):
        nll += float(torch.nn.functional.cross_entropy(z, nxt, reduction="sum"))
        n += len(z)
    test_s = time.perf_counter() - t0
    info = {"train_tokens": n_train, "train_s": train_s, "test_tokens": n, "test_s": test_s,
            "test_nll": nll / n, "test_ppl": math.exp(nll / n)}
    log(f"teacher: {n_train:,} train tokens in {train_s:.0f} s (with the store figures), test perplexity "
        f"{info['test_ppl']:.2f} over {n:,} tokens in {test_s:.0f} s")
    return col, full, info


# -- the encoders ----------------------------------------------------------------------------------
def shard(lengths: np.ndarray, columns: dict[str, np.ndarray], level: int, metadata: dict | None = None) -> bytes:
    """Parquet bytes of a token shard with the token codec's writer options: a row per sequence
    (lengths[r] positions), an int64 id, and per column list<fixed_size_list[k]> for [N, k]
    values or list<value> for [N] ones; byte-stream split on every value column."""
    import pyarrow as pa

    from ensemblekd.store import pack
    from ensemblekd.tasks import token

    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
    table = {"id": pa.array(np.arange(len(lengths)), pa.int64())}
    split = []
    for name, values in columns.items():
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        inner = pa.FixedSizeListArray.from_arrays(flat, values.shape[1]) if values.ndim == 2 else flat
        table[name] = pa.ListArray.from_arrays(offsets, inner)
        split.append(f"{name}.list.element.list.element" if values.ndim == 2 else f"{name}.list.element")
    opts = {**token.parquet_options(level), "use_byte_stream_split": split}
    return pack(pa.table(table, metadata=metadata), **opts)[0]


def sort_ids(logp: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token: (gaps of the ids sorted ascending — the first id, then id_i − id_{i−1} — as
    uint16, the log-probs in that order)."""
    order = np.argsort(idx, axis=1, kind="stable")
    ids = np.take_along_axis(idx, order, 1).astype(np.int64)
    gaps = np.diff(ids, axis=1, prepend=0).astype(np.uint16)
    return gaps, np.take_along_axis(logp, order, 1)


def unsort_ids(gaps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sort_ids undone: (values, ids) in descending-value order (ties by ascending id)."""
    ids = np.cumsum(gaps.astype(np.int64), axis=1)
    order = np.argsort(-values.astype(np.float32), axis=1, kind="stable")
    return np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1)


def encode_candidate(name: str, lengths, logp, idx, tail, level: int) -> bytes:
    """One fixed-k candidate's shard bytes (module docstring)."""
    from ensemblekd.tasks import token

    rows = np.arange(len(lengths))
    if name == "current":
        return token.encode(rows, lengths, logp, idx, tail, level=level)[0]
    if name == "sorted-f16":  # the current schema and writer, ids replaced by their sorted gaps
        gaps, values = sort_ids(logp, idx)
        return token.encode(rows, lengths, values, gaps, tail, level=level)[0]
    if name == "sorted-u8":
        gaps, values = sort_ids(logp, idx)
        return shard(lengths, {"topk_codes": quantise(values), "topk_indices": gaps, "tail_logprob": tail}, level)
    if name == "desc-u8":
        codes = quantise(logp)
        steps = np.diff(codes.astype(np.int16), axis=1, prepend=0).astype(np.uint8)
        return shard(lengths, {"topk_codes": steps, "topk_indices": idx, "tail_logprob": tail}, level)
    if name == "ranked":
        return token.encode(rows, lengths, logp, idx, tail, level=level, codec="ranked")[0]
    raise ValueError(name)


def encode_top_p(lengths, logp, idx, kept, tail, level: int) -> bytes:
    """The top-p shard: per row, the counts (list<uint8>) and its tokens' kept ids (sorted gaps,
    uint16) and codes (uint8) flattened into one list each, and the tail (list<float16>)."""
    import pyarrow as pa

    from ensemblekd.store import pack
    from ensemblekd.tasks import token

    start = np.concatenate([[0], np.cumsum(kept.astype(np.int64))])
    flat_g, flat_c = np.empty(start[-1], np.uint16), np.empty(start[-1], np.uint8)
    for n in np.unique(kept):  # the tokens that keep n ids, sorted as one block
        rows = np.nonzero(kept == n)[0]
        g, v = sort_ids(logp[rows, :n], idx[rows, :n])
        at = start[rows][:, None] + np.arange(n)[None, :]
        flat_g[at], flat_c[at] = g, quantise(v)
    row_start = np.concatenate([[0], np.cumsum(lengths)])
    per_token = pa.array(row_start.astype(np.int32))
    per_value = pa.array(start[row_start].astype(np.int32))
    table = pa.table({"id": pa.array(np.arange(len(lengths)), pa.int64()),
                      "topk_count": pa.ListArray.from_arrays(per_token, pa.array(kept)),
                      "topk_indices": pa.ListArray.from_arrays(per_value, pa.array(flat_g)),
                      "topk_codes": pa.ListArray.from_arrays(per_value, pa.array(flat_c)),
                      "tail_logprob": pa.ListArray.from_arrays(per_token, pa.array(tail))})
    split = [f"{c}.list.element" for c in ("topk_count", "topk_indices", "topk_codes", "tail_logprob")]
    return pack(table, **{**token.parquet_options(level), "use_byte_stream_split": split})[0]


def round_trips(logp, idx, tail, lengths) -> bool:
    """current decodes bit for bit; sorted-f16 gives back each token's same (id, log p) pairs."""
    from ensemblekd.store import unpack
    from ensemblekd.tasks import token

    back = token.decode(unpack(encode_candidate("current", lengths, logp, idx, tail, 3)))
    exact = (np.array_equal(back.logp.view(np.uint16), logp.view(np.uint16)) and np.array_equal(back.idx, idx)
             and np.array_equal(back.tail.view(np.uint16), tail.view(np.uint16)))
    s = token.decode(unpack(encode_candidate("sorted-f16", lengths, logp, idx, tail, 3)))
    values, ids = unsort_ids(s.idx, s.logp)
    by_id = np.argsort(idx, axis=1)
    by_id_back = np.argsort(ids, axis=1)
    same = (np.array_equal(np.take_along_axis(ids, by_id_back, 1), np.take_along_axis(idx.astype(np.int64), by_id, 1))
            and np.array_equal(np.take_along_axis(values, by_id_back, 1).view(np.uint16),
                               np.take_along_axis(logp, by_id, 1).view(np.uint16)))
    return bool(exact and same)


def measure_store(col: Collect, lengths: np.ndarray, vocab_size: int) -> dict[str, Any]:
    """Bytes per token of every candidate and k, with the kept mass and KL of what it stores."""
    out: dict[str, Any] = {"by_k": {}, "top_p": {}}
    for k in FRONTIER_KS:
        logp, idx, tail = (np.concatenate(a) for a in zip(*col.topk[k]))
        n = len(logp)
        m, kl, kl_u8 = (np.concatenate(d[k]) for d in (col.mass, col.kl, col.kl_u8))
        r: dict[str, Any] = {"k": k, "tokens": n, "raw_bytes_per_token": k * (2 + idx.itemsize) + 2,
                             "mass_mean": float(m.mean()), "mass_p5": float(np.quantile(m, 0.05)),
                             "kl_mean": float(kl.mean()), "kl_p95": float(np.quantile(kl, 0.95)),
                             "kl_u8_mean": float(kl_u8.mean()), "candidates": {}}
        if k in KS:
            r["kl_cmp_mean"] = float(np.concatenate(col.kl_cmp[k]).mean())
        levels = (3, 19) if k in KS else (3,)
        for name in CANDIDATES if k in KS else CANDIDATES[:-1]:
            c = r["candidates"][name] = {}
            for level in levels:
                t0 = time.perf_counter()
                c[f"zstd{level}"] = len(encode_candidate(name, lengths, logp, idx, tail, level)) / n
                c[f"zstd{level}_encode_tokens_per_s"] = n / (time.perf_counter() - t0)
            c["kl_mean"] = {"sorted-u8": r["kl_u8_mean"], "desc-u8": r["kl_u8_mean"],
                            "ranked": r.get("kl_cmp_mean")}.get(name, r["kl_mean"])
        if k in KS:
            r["round_trip"] = round_trips(logp, idx, tail, lengths)
        out["by_k"][k] = r
        log(f"store k={k}: " + ", ".join(f"{name} {c['zstd3']:.1f}" for name, c in r["candidates"].items())
            + f" B/token; mass {r['mass_mean']:.4f}, KL {r['kl_mean']:.4f} (u8 {r['kl_u8_mean']:.4f})")
    for p in TOP_PS:
        logp, idx, kept, tail = (np.concatenate(a) for a in zip(*col.top_p[p]))
        m, kl = np.concatenate(col.p_mass[p]), np.concatenate(col.p_kl[p])
        n = len(logp)
        out["top_p"][p] = {"p": p, "k_mean": float(kept.mean()), "k_p50": float(np.median(kept)),
                           "k_p95": float(np.quantile(kept, 0.95)), "at_k_max": float((kept == K_MAX).mean()),
                           "zstd3": len(encode_top_p(lengths, logp, idx, kept, tail, 3)) / n,
                           "zstd19": len(encode_top_p(lengths, logp, idx, kept, tail, 19)) / n,
                           "mass_mean": float(m.mean()), "mass_p5": float(np.quantile(m, 0.05)),
                           "kl_mean": float(kl.mean())}
        out["top_p"][p].update(equal_bytes(out["by_k"], out["top_p"][p]["zstd3"]))
        log(f"store top-p {p}: mean k {kept.mean():.1f}, {out['top_p'][p]['zstd3']:.1f} B/token, "
            f"mass {m.mean():.4f}, KL {kl.mean():.4f}")
    out["tail_vs_mass_max_abs"] = col.tail_gap
    return out


def equal_bytes(by_k: dict[int, dict], size: float) -> dict[str, Any]:
    """Fixed-k sorted-u8 at `size` B/token: KL and mass interpolated linearly in log bytes between
    the neighbouring k of FRONTIER_KS (None outside their range)."""
    pts = sorted((by_k[k]["candidates"]["sorted-u8"]["zstd3"], by_k[k]["kl_u8_mean"], by_k[k]["mass_mean"])
                 for k in FRONTIER_KS)
    for (b0, kl0, m0), (b1, kl1, m1) in zip(pts, pts[1:]):
        if b0 <= size <= b1:
            f = (math.log(size) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return {"fixed_k_kl_at_equal_bytes": kl0 + f * (kl1 - kl0), "fixed_k_mass_at_equal_bytes": m0 + f * (m1 - m0)}
    return {"fixed_k_kl_at_equal_bytes": None, "fixed_k_mass_at_equal_bytes": None}


# -- students ------------------------------------------------------------------------------------
def train_student(name: str, train, targets, test, sizes: Sizes, vocab_size: int, seed: int) -> dict[str, Any]:
    """One student: the same init (seed), shuffles and schedule (fitting.fit_module) whatever the
    targets; targets = ('topk', (logp, idx, tail)), ('full', float16 log-probs) or ('ce', None),
    rows aligned with the train subset's target positions. Returns its test perplexity."""
    import torch
    import torch.nn.functional as F

    from ensemblekd import lm, topk
    from ensemblekd.fitting import fit_module

    tokens, _, positions = train
    starts = np.concatenate([[0], np.cumsum([len(p) for p in positions])])
    kind, data = targets

    def batch_loss(rows) -> torch.Tensor:
        rows = rows.numpy()
        logits = lm.logits_of(student(padded([tokens[r] for r in rows])))
        z = torch.cat([logits[i, positions[r]] for i, r in enumerate(rows)])
        at = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows])
        labels = torch.from_numpy(np.concatenate([tokens[r][positions[r] + 1] for r in rows]))
        if kind == "ce":
            return F.cross_entropy(z, labels)
        if kind == "full":
            lp_t = torch.from_numpy(data[at]).float()
            return (lp_t.exp() * (lp_t - F.log_softmax(z, dim=-1))).sum(-1).mean()
        logp, idx, tail = (a[at] for a in data)
        return topk.token_loss(z, labels, logp[:, None], idx[:, None], tail[:, None], vocab_size, temperature=1.0,
                               alpha=0.0).loss

    torch.manual_seed(seed)
    student = lm.tiny_gpt2(vocab_size, n_layer=sizes.n_layer, n_embd=sizes.n_embd, n_head=sizes.n_head,
                           n_positions=max(len(t) for t in tokens + test[0]))
    t0 = time.perf_counter()
    fit_module(student, len(tokens), batch_loss, sizes.epochs, sizes.lr, sizes.batch_size, seed)
    fit_s = time.perf_counter() - t0
    nll, n = 0.0, 0
    for z, nxt in target_logits(student, test[0], test[2], sizes.chunk_rows):
        nll += float(F.cross_entropy(z, nxt, reduction="sum"))
        n += len(z)
    r = {"student": name, "fit_s": fit_s, "epoch_s": fit_s / sizes.epochs, "test_nll": nll / n,
         "test_ppl": math.exp(nll / n), "parameters": sum(p.numel() for p in student.parameters())}
    log(f"student {name}: test perplexity {r['test_ppl']:.2f} (fit {fit_s:.0f} s, {r['epoch_s']:.0f} s/epoch)")
    return r


def run_students(col: Collect, full: np.ndarray, train, test, sizes: Sizes, vocab_size: int, seed: int) -> list[dict]:
    runs = [(f"top-{k}", ("topk", tuple(np.concatenate(a) for a in zip(*col.topk[k])))) for k in KS]
    runs.insert(2, ("top-32, codec ranked", ("topk", ranked(*runs[1][1][1]))))
    runs += [("full", ("full", full)), ("next tokens (alpha = 1)", ("ce", None))]
    return [train_student(name, train, targets, test, sizes, vocab_size, seed) for name, targets in runs]


# -- report ----------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    m, st, t, store = res["machine"], res["settings"], res["teacher"], res["store"]
    by_k, students = store["by_k"], res["students"]
    sz = st["sizes"]
    from ensemblekd.testing import markdown_table

    lines = [
        "# Token-level soft targets from a real LM: store cost and student perplexity",
        "",
        (f"Generated by `python tools/bench_lm_real.py{' --quick' if st['quick'] else ''}` on {m['date']} in "
         f"{res['minutes']:.1f} min{QUICK_NOTE if st['quick'] else ''}."),
        (f"Machine: {m['cpu']}, {m['cores']} cores ({st['threads']} torch thread used), {m['memory_gib']:.0f} GiB; "
         f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, pyarrow {m['pyarrow']}, "
         f"numpy {m['numpy']}; load average at start {m['load_average_at_start'][0]:.1f} (the machine was shared)."),
        f"Measured version of `ensemblekd/topk.py` + `ensemblekd/tasks/token/codec.py`: sha256 {m['topk_codec_sha256']}.",
        "",
        (f"Teacher: SmolLM2-135M-Instruct (`{st['gguf_name']}`, dequantised to float32 by `lm.from_gguf`), "
         f"V = {res['vocab_size']:,}. Text: CPython's pydoc topics (`data.text.prepare_pydoc`, rows of 256 "
         f"tokens, split by topic). The teacher labels {sz['train_rows']} full-length train rows chosen with "
         f"seed {st['seed']} ({t['train_tokens']:,} target tokens, {t['train_s']:.0f} s with the store "
         f"figures) and the test split ({t['test_tokens']:,} target tokens, {t['test_s']:.0f} s): "
         f"**teacher test perplexity {t['test_ppl']:.2f}** (NLL {t['test_nll']:.3f} nats/token)."),
        "",
        "## The store, per k (train subset, one Parquet shard of all its rows)",
        "",
        ("Bytes = `tasks.token.encode` (zstd 3, the default; and at zstd 19), the whole file over its tokens. "
         "Mass kept = Σ top-k p of the float32 softmax. KL = KL(full ‖ stored) in nats/token, stored = "
         "`topk.dense_from_topk` renormalised (the tail spread evenly). Full float16 logits: "
         f"{2 * res['vocab_size']:,} B/token."),
    ]
    table = []
    for k in KS:
        r = by_k[k]
        c, rk = r["candidates"]["current"], r["candidates"]["ranked"]
        goal = BYTE_GOALS.get(k)
        met = "—" if goal is None else " / ".join("yes" if x["zstd3"] <= goal else "**no**" for x in (c, rk))
        table.append([k, r["raw_bytes_per_token"], f"{c['zstd3']:.1f}", f"{c['zstd19']:.1f}", f"{rk['zstd3']:.1f}",
                      f"{2 * res['vocab_size'] / c['zstd3']:,.0f}×", f"{r['mass_mean']:.4f}", f"{r['mass_p5']:.4f}",
                      f"{r['kl_mean']:.4f}", f"{r['kl_p95']:.4f}", f"≤ {goal:g} B/token" if goal else "—", met])
    lines += [
        "",
        markdown_table(["k", "raw B/token", "store B/token", "at zstd 19", "codec ranked", "× smaller than full",
                        "mass kept, mean", "mass kept, p5", "KL nats/token", "KL p95", "goal", "met (float16 / ranked)"],
                       table, left=0),
        "",
        ("Checks: `tasks.token.decode` gives back exactly what was encoded, and sorted-f16 each token's same "
         f"(id, log p) pairs: {'yes' if all(by_k[k]['round_trip'] for k in KS) else '**no**'}; "
         f"1 − exp(tail) matches the mass kept to within {store['tail_vs_mass_max_abs']:.1e}."),
        "",
        "## Candidate encoders (B/token at zstd 3 / zstd 19, KL of what each stores)",
        "",
        ("current = the shard codec; sorted-f16 = ids sorted ascending per token and delta-coded (uint16), "
         "log p float16 permuted alongside, lossless; sorted-u8 = the same with log p as uint8 codes "
         f"round(−{CODES_PER_NAT} log p) clamped to 0..255; desc-u8 = ids in log-p order, codes delta-coded "
         "along it; ranked = `store.codec: ranked`: ids as their rank in the shard's id frequency (the map "
         "in the file's metadata), sorted and delta-coded, log p companded to uint8 (steps 1/16 nat to 4 "
         "nats, doubling every 4 nats up to 1/2), renormalised on decoding; measured at k = 8, 32, 128 only. All: Parquet, zstd, no "
         "dictionary, byte-stream split on every value column, the tail float16. KL: of the float16 log p "
         "(current, sorted-f16), of the uint8 codes (sorted-u8, desc-u8), of the companded codes (ranked)."),
    ]
    table = []
    for k in FRONTIER_KS:
        r = by_k[k]
        cells = []
        for name in CANDIDATES:
            c = r["candidates"].get(name)
            cells.append("—" if c is None else f"{c['zstd3']:.1f} / {c['zstd19']:.1f}" if "zstd19" in c
                         else f"{c['zstd3']:.1f}")
        goal = BYTE_GOALS.get(k)
        table.append([k, *cells, f"{r['kl_mean']:.4f}", f"{r['kl_u8_mean']:.4f}",
                      f"{r['kl_cmp_mean']:.4f}" if "kl_cmp_mean" in r else "—", f"≤ {goal:g}" if goal else "—"])
    lines += [
        "",
        markdown_table(["k", *CANDIDATES, "KL, float16 log p", "KL, uint8 codes", "KL, companded", "goal"], table, left=0),
        "",
        f"## Mass-adaptive top-p (sorted-u8 layout, 1 ≤ k ≤ {K_MAX}) against fixed k at equal bytes",
        "",
        "Fixed k at equal bytes: the sorted-u8 fixed-k figures above, interpolated linearly in log bytes.",
        "",
        markdown_table(["p", "k mean", "k p50", "k p95", "at k max", "B/token (zstd 3 / 19)", "mass kept, mean",
                        "mass kept, p5", "KL nats/token", "fixed k at equal bytes: KL", "fixed k: mass"],
                       [[p, f"{r['k_mean']:.1f}", f"{r['k_p50']:.0f}", f"{r['k_p95']:.0f}", f"{r['at_k_max']:.1%}",
                         f"{r['zstd3']:.1f} / {r['zstd19']:.1f}", f"{r['mass_mean']:.4f}", f"{r['mass_p5']:.4f}",
                         f"{r['kl_mean']:.4f}",
                         *("—" if v is None else f"{v:.4f}"
                           for v in (r["fixed_k_kl_at_equal_bytes"], r["fixed_k_mass_at_equal_bytes"]))]
                        for p, r in store["top_p"].items()], left=0),
    ]
    lines += ["", "Byte goals per candidate (zstd 3, the default level):", ""]
    for name in CANDIDATES:
        lines.append(f"- {name}: " + "; ".join(
            f"k = {k}: {by_k[k]['candidates'][name]['zstd3']:.1f} B/token (goal ≤ {g:g}: "
            f"{'met' if by_k[k]['candidates'][name]['zstd3'] <= g else 'not met'})" for k, g in sorted(BYTE_GOALS.items())))
    full = next(s for s in students if s["student"] == "full")
    top32 = next(s for s in students if s["student"] == "top-32")
    ranked32 = next(s for s in students if s["student"] == "top-32, codec ranked")
    gap = top32["test_ppl"] / full["test_ppl"] - 1
    lines += [
        "",
        "## Students: test perplexity",
        "",
        (f"tiny GPT-2 ({sz['n_layer']} layer(s), n_embd {sz['n_embd']}, {sz['n_head']} heads, "
         f"{students[0]['parameters']:,} parameters), the same init (seed {st['seed']}), shuffles and schedule "
         f"for all (`fitting.fit_module`: AdamW lr {sz['lr']:g}, cosine decay per epoch, {sz['epochs']} epochs "
         f"of {sz['train_rows']} rows, batches of {sz['batch_size']} rows), one torch thread. Distilled at "
         "T = 1, alpha = 0: top-k with `topk.token_loss`, full with a dense KL on the float16 log-probs; "
         "'next tokens' is cross-entropy alone (alpha = 1). Perplexity = exp(mean NLL) over the test "
         "split's target tokens, the same tokens as the teacher's. The budget (the whole step under 10 min on one "
         "thread) leaves the students far from the teacher: this compares the targets early in training, where "
         "the shape of the teacher's tail (spread evenly in the top-k store) still matters most."),
        "",
        markdown_table(["student", "test perplexity", "NLL nats/token", "vs full", "fit s", "s/epoch"],
                       [*([s["student"], f"{s['test_ppl']:.2f}", f"{s['test_nll']:.4f}",
                           f"{s['test_ppl'] / full['test_ppl'] - 1:+.1%}", f"{s['fit_s']:.0f}", f"{s['epoch_s']:.0f}"]
                          for s in students),
                        ["teacher (SmolLM2-135M)", f"{t['test_ppl']:.2f}", f"{t['test_nll']:.4f}", "—", "—", "—"]]),
        "",
        (f"Goal: top-32 within {PPL_GOAL:.0%} of full: {top32['test_ppl']:.2f} against {full['test_ppl']:.2f} "
         f"({gap:+.1%}): **{'met' if gap <= PPL_GOAL else 'not met'}**."),
        "",
        (f"What the ranked codec costs the student at k = 32: {ranked32['test_ppl']:.2f} against "
         f"{top32['test_ppl']:.2f} from the float16 store ({ranked32['test_ppl'] / top32['test_ppl'] - 1:+.2%}), "
         f"for {by_k[32]['candidates']['ranked']['zstd3']:.1f} against "
         f"{by_k[32]['candidates']['current']['zstd3']:.1f} B/token."),
    ]
    return "\n".join(lines) + "\n"


def rows_of(split, rows: np.ndarray | None):
    tokens, masks = split
    if rows is not None:
        tokens, masks = [tokens[i] for i in rows], [masks[i] for i in rows]
    return tokens, masks, target_positions(masks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tools/results", help="where lm_real.md and lm_real.json go (default tools/results)")
    p.add_argument("--quick", action="store_true", help="smoke test: a few rows, one short epoch per student")
    p.add_argument("--work", default="/tmp/bench_lm_real",
                   help="the GGUF file (copied there once) and the prepared pydoc splits (default /tmp/bench_lm_real)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the train subset's and the students' seed (default 0)")
    args = p.parse_args(argv)
    import torch

    from ensemblekd import lm
    from ensemblekd.data.text import prepare_pydoc

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    gguf = os.path.join(args.work, "smollm2.gguf")
    if not os.path.isfile(gguf):
        log(f"copying the built-in SmolLM2 GGUF to {gguf}")
        lm.builtin_gguf("smollm2", gguf)
    paths = prepare_pydoc(os.path.join(args.work, "pydoc"), gguf, seq_len=256)
    train_all, test_all = read_split(paths["train"]), read_split(paths["test"])
    full_rows = np.nonzero([len(t) == 256 for t in train_all[0]])[0]
    chosen = np.sort(np.random.default_rng(args.seed).choice(full_rows, sizes.train_rows, replace=False))
    train = rows_of(train_all, chosen)
    test = rows_of(test_all, None if sizes.test_rows is None else np.arange(sizes.test_rows))
    t0 = time.perf_counter()
    model = lm.from_gguf(gguf)
    vocab_size = lm.logits_of(model(torch.zeros(1, 2, dtype=torch.long))).shape[-1]
    log(f"SmolLM2 loaded in {time.perf_counter() - t0:.0f} s, V = {vocab_size:,}")
    col, full, teacher = run_teacher(model, train, test, sizes, vocab_size)
    del model
    lengths = np.array([len(p) for p in train[2]])
    from bench_common import lm_machine

    res: dict[str, Any] = {"machine": lm_machine(), "vocab_size": vocab_size, "teacher": teacher,
                           "settings": {"quick": args.quick, "threads": args.threads, "seed": args.seed,
                                        "gguf_name": lm.BUILTIN_GGUF["smollm2"][1], "train_row_ids": chosen.tolist(),
                                        "sizes": asdict(sizes), "ks": list(KS), "frontier_ks": list(FRONTIER_KS),
                                        "top_ps": list(TOP_PS), "k_max": K_MAX, "codes_per_nat": CODES_PER_NAT}}
    res["store"] = measure_store(col, lengths, vocab_size)
    res["students"] = run_students(col, full, train, test, sizes, vocab_size, args.seed)
    res["minutes"] = (time.perf_counter() - start) / 60
    import json

    from ensemblekd.testing import write_results

    res = json.loads(json.dumps(res, default=str))  # int and float keys -> str, as they will be read back
    res["store"]["by_k"] = {int(k): v for k, v in res["store"]["by_k"].items()}
    text = markdown(res)
    write_results(out, "lm_real", res, res["students"], text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
