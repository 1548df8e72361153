"""The one vocabulary teachers, student and store share: its size and tokenizer hash, recorded in
the manifest (Task.store_info), and teachers' logits cut to it."""

from __future__ import annotations

import sys
from typing import Any

import torch

from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.lm import vocab_hash
from ensemblekd.teachers import kind_of


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
