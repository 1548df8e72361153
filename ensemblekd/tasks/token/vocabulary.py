"""The one vocabulary teachers, student and store share: its size and tokenizer hash, recorded in
the manifest (Task.store_info), and teachers' logits cut to it."""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np
import torch

from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.lm import vocab_hash
from ensemblekd.teachers import kind_of


# -- the vocabulary ------------------------------------------------------------------------------
def vocabulary(cfg: Config) -> dict[str, Any]:
    """The manifest's record of the shared vocabulary (size, tokenizer hash, top-k, codec) and of
    each teacher that reads the text with a tokenizer of its own (own_tokenizers: name -> hash).
    Without a shared tokenizer the ids are synthetic and the hash says so."""
    d = cfg.data
    assert d.vocab_size is not None  # check_config requires it
    shared = tokenizer_path(cfg)
    info = {"vocab_size": d.vocab_size, "vocab_hash": _hash_of(shared) if shared else vocab_hash(d.vocab_size),
            "top_k": min(cfg.store.top_k, d.vocab_size), "codec": cfg.store.codec}
    own = {t.name: _hash_of(path) for t in cfg.teachers if (path := own_tokenizer(cfg, t))}
    if own and len(own) == len(cfg.teachers):
        raise UserError(f"data.tokenizer: no teacher reads the student's tokenizer ({shared}), so there is no ensemble "
                        "to learn from position by position; name one of the teachers (data.tokenizer: <name>)")
    return {**info, "own_tokenizers": own} if own else info


def own_tokenizer(cfg: Config, t) -> str | None:
    """The tokenizer of teacher t when it is not the shared one (it then reads each row's text with
    it: docs/cross-tokenizer.md); None when t reads the shared ids."""
    path, shared = kind_of(t).tokenizer(t), tokenizer_path(cfg)
    if path is None or shared is None or _hash_of(path) == _hash_of(shared):
        return None
    return path


@functools.lru_cache(maxsize=8)
def _hash_of(path: str) -> str:
    """vocab_hash of a tokenizer file, once per process (a 262k vocabulary takes a second)."""
    return vocab_hash(path)


def own_tokens(path: str, texts: list[str] | None, teacher: str, where: str
               ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Each row's text in a teacher's own tokenizer: (tokens [R, L] right-padded, lengths [R],
    (its token ids, their byte ends), both flat) for label_shard and the codec. A row starts with
    the tokenizer's beginning-of-sequence token when it puts one there (begins_with; byte end 0, so
    never aligned, but its prediction of the first token counts in bits per byte). A row may be one
    token in it (a short row of the shared tokenizer): it then predicts nothing."""
    from ensemblekd.crosstok import byte_ends
    from ensemblekd.lm import load_tokenizer

    if texts is None:
        raise UserError(f"teacher '{teacher}': its tokenizer is not data.tokenizer, so it reads each row's text, and "
                        f"{where} has none; write the splits from text (data.text, or data.prepare: pydoc)")
    tokenizer = load_tokenizer(path)
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    bos = begins_with(tokenizer)
    rows = [np.asarray(([] if bos is None else [bos]) + ids, np.int64) for ids in encoded["input_ids"]]
    ends = [np.concatenate([[0] * (bos is not None), byte_ends(text, offsets)]).astype(np.int64)
            for text, offsets in zip(texts, encoded["offset_mapping"])]
    lengths = np.array([len(r) for r in rows], np.int64)
    if len(rows) and lengths.min() < 1:
        raise UserError(f"teacher '{teacher}': row {int(np.argmin(lengths))} of {where} has no text; write the splits "
                        "again (data.text, or data.prepare: pydoc)")
    tokens = np.zeros((len(rows), int(lengths.max()) if len(rows) else 0), np.int64)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = ids
    return tokens, lengths, (np.concatenate(rows), np.concatenate(ends))


def begins_with(tokenizer) -> int | None:
    """The id a tokenizer puts before every text (Gemma's <bos>: without it Gemma 3 270M scores
    perplexity 68 on pydoc text instead of 17), or None (SmolLM2's puts none)."""
    bos = tokenizer.bos_token_id
    first = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and first and first[0] == bos else None


def tokenizer_path(cfg: Config) -> str | None:
    """The shared tokenizer, the student's: data.tokenizer's directory or file, the named teacher's
    own, or with 'teachers' the first pretrained teacher's; None for synthetic ids."""
    given = cfg.data.tokenizer
    named = next((t for t in cfg.teachers if t.name == given), None)
    if named is not None:
        return kind_of(named).tokenizer(named)
    if given != "teachers":
        return given
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
