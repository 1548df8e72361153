"""The token task's reader: sequences and their teachers' stored targets as training batches of
target positions, a split read into memory, and a model's next-token accuracy."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ensemblekd.config import Config
from ensemblekd.data.inputs import input_shards, read_token_shard
from ensemblekd.lm import logits_of
from ensemblekd.losses import IGNORE
from ensemblekd.tasks.token.vocabulary import shared_vocabulary


# -- batches -------------------------------------------------------------------------------------
class TokenBatch(NamedTuple):
    """A micro-batch of sequences and the N target positions in it."""

    tokens: torch.Tensor        # [B, L] long, right-padded
    positions: torch.Tensor     # [N] flat index into the student's [B * L] positions
    labels: torch.Tensor        # [N] the next token at each position
    logp: torch.Tensor          # [N, K, k] teachers' top-k log-probs (float16)
    idx: torch.Tensor           # [N, K, k]
    tail: torch.Tensor          # [N, K] log tail mass (float16)
    present: torch.Tensor       # [N, K] bool: the teacher has read the same bytes as the student there
    teacher_labels: torch.Tensor  # [N, K] each teacher's own next token there (IGNORE where not present)
    maps: tuple = ()            # per teacher: None (the student's vocabulary) or its vocabulary map [V_t] (long)

    def to(self, device) -> TokenBatch:
        return TokenBatch._make([*(t.to(device) for t in self[:-1]),
                                 tuple(None if m is None else m.to(device) for m in self.maps)])


class Aligned(NamedTuple):
    """Where a teacher with its own tokenizer meets the student in one shard (crosstok.aligned_positions)."""

    where: np.ndarray           # [R, W - 1]: the teacher's flat position at student position j of row r, or −1
    following: np.ndarray       # [N_t] the teacher's own next token at each of its positions


class Targets(NamedTuple):
    """One teacher's stored targets of a shard: flat over its positions, row r's from offsets[r]."""

    offsets: np.ndarray         # [R + 1]
    logp: np.ndarray
    idx: np.ndarray
    tail: np.ndarray
    aligned: Aligned | None = None  # None: the teacher reads the student's tokens (every position is shared)
    vocab_map: torch.Tensor | None = None  # with aligned: its ids -> the student's (crosstok.vocab_map), long


class Sequences(NamedTuple):
    """One input shard for training: its sequences and each teacher's Targets."""

    tokens: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray
    targets: list[Targets]


def make_batch(rows: np.ndarray, tokens, lengths, mask, targets: list[Targets]) -> TokenBatch:
    width = int(lengths[rows].max())
    inside = np.arange(1, width)[None, :] < lengths[rows][:, None]  # padding is never a target, whatever the mask
    r, j = np.nonzero(mask[rows, 1:width] & inside)     # position j of batch row r predicts token j + 1
    src = rows[r]
    labels = tokens[src, j + 1]
    picked, present, own_labels = [], [], []
    for t in targets:
        if t.aligned is None:
            picked.append(t.offsets[src] + j)
            present.append(np.ones(len(r), bool))
            own_labels.append(labels)
        else:
            at = t.aligned.where[src, j]
            present.append(at >= 0)
            picked.append(np.where(at >= 0, at, 0))
            own_labels.append(np.where(at >= 0, t.aligned.following[picked[-1]], IGNORE))
    n = len(r)
    if not targets:
        return TokenBatch(torch.from_numpy(np.ascontiguousarray(tokens[rows, :width])), torch.from_numpy(r * width + j),
                          torch.from_numpy(labels), torch.zeros(n, 0, 0, dtype=torch.float16),
                          torch.zeros(n, 0, 0, dtype=torch.long), torch.zeros(n, 0, dtype=torch.float16),
                          torch.zeros(n, 0, dtype=torch.bool), torch.zeros(n, 0, dtype=torch.long), ())
    stack = lambda field: np.stack([getattr(t, field)[p] for t, p in zip(targets, picked)], axis=1)  # noqa: E731
    return TokenBatch(torch.from_numpy(np.ascontiguousarray(tokens[rows, :width])), torch.from_numpy(r * width + j),
                      torch.from_numpy(labels), torch.from_numpy(stack("logp")),
                      torch.from_numpy(stack("idx").astype(np.int64)), torch.from_numpy(stack("tail")),
                      torch.from_numpy(np.stack(present, axis=1)),
                      torch.from_numpy(np.stack(own_labels, axis=1).astype(np.int64)),
                      tuple(t.vocab_map for t in targets))


def align(student_ends: np.ndarray, lengths: np.ndarray, stored) -> Aligned:
    """A teacher's stored positions (codec TopK with own_tokens and byte_ends) aligned with the
    student's rows: student_ends [R, W] (each token's byte end in its row's text), lengths [R]."""
    from ensemblekd.crosstok import aligned_positions

    where = np.full((len(lengths), max(int(lengths.max()) - 1, 0) if len(lengths) else 0), -1, np.int64)
    token_starts = np.concatenate([[0], np.cumsum(stored.lengths + 1)])
    position_starts = np.concatenate([[0], np.cumsum(stored.lengths)])
    following = np.zeros(int(stored.lengths.sum()), np.int64)
    for r in range(len(lengths)):
        own = slice(token_starts[r], token_starts[r + 1])
        s_pos, t_pos = aligned_positions(student_ends[r, :lengths[r]], stored.byte_ends[own])
        where[r, s_pos] = position_starts[r] + t_pos
        following[position_starts[r]:position_starts[r + 1]] = stored.own_tokens[own][1:]
    return Aligned(where, following)


def join_batches(pieces: list[tuple[np.ndarray, tuple]]) -> TokenBatch:
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
    return TokenBatch._make([torch.cat(tokens), torch.cat(positions),
                             *(torch.cat(f) for f in list(zip(*parts))[2:-1]), parts[0].maps])


def next_at(stored, rows: Sequences, picked_rows: np.ndarray) -> torch.Tensor:
    """[N, K] stored next-token log-probs at make_batch's positions (same order: row by row, j rising)."""
    width = int(rows.lengths[picked_rows].max())
    inside = np.arange(1, width)[None, :] < rows.lengths[picked_rows][:, None]
    r, j = np.nonzero(rows.mask[picked_rows, 1:width] & inside)
    src = picked_rows[r]
    return torch.from_numpy(np.stack([values[offsets[src] + j] for offsets, values in stored], axis=1).astype(np.float32))


def _char_starts(text: str) -> np.ndarray:
    """[len(bytes) + 1]: how many characters start before each byte offset of text's UTF-8."""
    raw = np.frombuffer(text.encode(), np.uint8)
    return np.concatenate([[0], np.cumsum((raw & 0xC0) != 0x80)])


def target_spans(text: tuple[list[str], np.ndarray], lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[bytes, characters] of the tokens the student predicts in a shard (its target positions):
    text = (each row's text, its tokens' byte ends [R, W]) as data.inputs.read_row_text gives."""
    texts, ends = text
    inside = np.arange(1, mask.shape[1])[None, :] < lengths[:, None]
    r, j = np.nonzero(mask[:, 1:] & inside)                 # position j predicts token j + 1
    starts, stops = ends[r, j], ends[r, j + 1]
    chars = sum(int((c := _char_starts(texts[row]))[stops[r == row]].sum() - c[starts[r == row]].sum())
                for row in np.unique(r))
    return np.array([float((stops - starts).sum()), float(chars)])


def own_spans(texts: list[str], stored) -> list[float]:
    """[bytes, characters] of the tokens a teacher with its own tokenizer predicts in a shard: all
    its tokens but each row's first (stored: codec TopK with byte_ends)."""
    starts = np.concatenate([[0], np.cumsum(stored.lengths + 1)])
    n_bytes = n_chars = 0
    for row, text in enumerate(texts):
        ends = stored.byte_ends[starts[row]:starts[row + 1]]
        if len(ends) > 1:
            c = _char_starts(text)
            n_bytes += int(ends[-1] - ends[0])
            n_chars += int(c[ends[-1]] - c[ends[0]])
    return [float(n_bytes), float(n_chars)]


def bits(nll_sum: float, n_bytes: float, n_chars: float) -> dict[str, float | None]:
    """A model's NLL (nats, summed over what it predicted) in bits per byte and per character
    (crosstok); None without text to count them in."""
    from ensemblekd.crosstok import bits_per_byte, bits_per_char

    return {"bits_per_byte": bits_per_byte(nll_sum, int(n_bytes)) if n_bytes else None,
            "bits_per_char": bits_per_char(nll_sum, int(n_chars)) if n_chars else None}


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
