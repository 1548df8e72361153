"""Causal language models for token-level distillation, and a synthetic language to fit them on.

Models are referenced from configs as 'ensemblekd.lm:NAME' with kwargs, like ensemblekd.models.
Every builder returns a `CausalLM`: forward(input_ids [B, L] long, attention_mask=None) gives
logits [B, L, V] as a plain tensor, so callers never deal with Hugging Face output objects.
The tiny builders make the model from a transformers config in code: nothing is downloaded.

`markov_corpus` is a fixed random sparse Markov chain over a Zipf-distributed vocabulary: models
fitted on it predict peaked next-token distributions, as real LMs do (most of the mass in a few
dozen tokens), which is what compressed top-k soft targets rely on: at V = 512 a tiny GPT-2 fitted
for seconds keeps about 0.97 of its mass in its top 32 (tools/results/lm_store.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ensemblekd import storage
from ensemblekd.errors import UserError


# -- models ---------------------------------------------------------------------------------
class CausalLM(nn.Module):
    """A Hugging Face causal LM whose forward returns the logits tensor [B, L, V].

    The HF model sits under `lm`, so state-dict keys are `lm.<HF key>`: stable across builds of
    the same config, and the checkpoint loads back into a fresh build.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.lm = hf_model

    @property
    def vocab_size(self) -> int:
        return int(self.lm.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # use_cache=False: no key/value cache is built for a single full-sequence pass
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# bos/eos/pad: the GPT-2 defaults (50256) lie outside a small vocabulary; None means "no such token".
_NO_SPECIAL = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_positions: int = 128,
              dropout: float = 0.0) -> nn.Module:
    """A randomly initialised GPT-2 (tied input/output embeddings); dropout off by default, so a
    teacher's logits depend on its weights only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **_NO_SPECIAL)
    return CausalLM(GPT2LMHeadModel(config))


def tiny_llama(vocab_size: int, num_hidden_layers: int = 2, hidden_size: int = 64, num_attention_heads: int = 2,
               intermediate_size: int = 128, max_position_embeddings: int = 128) -> nn.Module:
    """A randomly initialised Llama (RMSNorm, rotary positions, SwiGLU; untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
                         num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         **_NO_SPECIAL)
    return CausalLM(LlamaForCausalLM(config))


def from_pretrained(path: str) -> nn.Module:
    """A Hugging Face causal LM saved in a local directory (save_pretrained), as a CausalLM.

    local_files_only: a typo must fail here, not turn into a download attempt on a worker.
    """
    from transformers import AutoModelForCausalLM

    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise UserError(f"from_pretrained: '{path}' is not a directory; point it at a save_pretrained model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"from_pretrained: '{path}' has no config.json; it is not a Hugging Face model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"from_pretrained: cannot load a causal LM from '{path}' ({first})") from None
    return CausalLM(model).eval()


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or its `.logits` (a HF ModelOutput), so
    any 'module:callable' LM works, wrapped in CausalLM or not."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"an LM must return a logits tensor or an object with .logits, not {type(output).__name__}")


# -- vocabularies ---------------------------------------------------------------------------
def vocab_hash(tokenizer_or_vocab: Any) -> str:
    """A short sha256 of a vocabulary (token -> id, sorted), to check that teachers and student
    share one: top-k indices mean nothing under another tokenizer.

    Accepts a local tokenizer directory, a tokenizer (anything with get_vocab()), a dict vocab,
    or an int V: a synthetic vocabulary of ids 0..V-1 with no tokenizer.
    """
    obj = tokenizer_or_vocab
    if isinstance(obj, bool):
        raise TypeError("vocab_hash: expected a tokenizer, a path, a dict or an int, not a bool")
    if isinstance(obj, (int, np.integer)):
        payload = f"synthetic:{int(obj)}"
    else:
        if isinstance(obj, (str, os.PathLike)):
            obj = _load_tokenizer(os.fspath(obj))
        vocab = obj if isinstance(obj, dict) else obj.get_vocab()
        payload = json.dumps(sorted((str(t), int(i)) for t, i in vocab.items()), ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise UserError(f"vocab_hash: tokenizer directory '{path}' does not exist")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"vocab_hash: cannot load a tokenizer from '{path}' ({first})") from None


# -- a synthetic language -------------------------------------------------------------------
def _zipf(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return p / p.sum()


def markov_chain(vocab_size: int, branching: int = 8, seed: int = 0, unigram_exponent: float = 1.1,
                 successor_exponent: float = 1.5, modes: int = 2) -> dict[str, np.ndarray]:
    """The chain behind markov_corpus, deterministic by seed.

    Token frequencies follow a Zipf law over a random permutation of the ids (a few tokens are
    common, most are rare, as in text). Each token has `branching` successors drawn from that
    unigram, ranked with Zipf probabilities; the token before it picks one of `modes` rotations
    of the ranking (second-order context: a model that only sees the last token is less sure).
    """
    if vocab_size < 2 or branching < 1 or modes < 1:
        raise ValueError("markov_chain needs vocab_size >= 2, branching >= 1 and modes >= 1")
    rng = np.random.default_rng([seed, 0])
    rank_to_token = rng.permutation(vocab_size)
    unigram = _zipf(vocab_size, unigram_exponent)
    cdf = np.cumsum(unigram)
    draws = np.minimum(np.searchsorted(cdf, rng.random((vocab_size, branching))), vocab_size - 1)
    successors = rank_to_token[draws]  # duplicates (rare but for the commonest tokens) just merge
    shift = rng.integers(0, modes, vocab_size) * max(branching // modes, 1)
    return {"successors": successors.astype(np.int64), "shift": shift,
            "successor_probs": _zipf(branching, successor_exponent), "start": rank_to_token, "start_cdf": cdf}


def markov_corpus(vocab_size: int, num_sequences: int, seq_len: int, branching: int = 8, seed: int = 0,
                  sample_seed: int | None = None, **chain_kwargs) -> np.ndarray:
    """[num_sequences, seq_len] int32 token ids sampled from markov_chain(vocab_size, branching, seed).

    The chain depends on `seed` only; `sample_seed` (default: seed) draws the sequences, so
    held-out text from the same language is another sample_seed.
    """
    chain = markov_chain(vocab_size, branching, seed, **chain_kwargs)
    rng = np.random.default_rng([seed if sample_seed is None else sample_seed, 1])
    out = np.empty((num_sequences, seq_len), dtype=np.int64)
    if seq_len == 0 or num_sequences == 0:
        return out.astype(np.int32)
    start = np.minimum(np.searchsorted(chain["start_cdf"], rng.random(num_sequences)), vocab_size - 1)
    out[:, 0] = chain["start"][start]
    prev = out[:, 0]  # at t = 1 the "token before" is the first token itself
    for t in range(1, seq_len):
        cur = out[:, t - 1]
        j = (rng.choice(branching, size=num_sequences, p=chain["successor_probs"]) + chain["shift"][prev]) % branching
        out[:, t] = chain["successors"][cur, j]
        prev = cur
    return out.astype(np.int32)


def write_token_split(out_dir: str, tokens: np.ndarray | Sequence[np.ndarray], shard_rows: int = 256,
                      first_id: int = 0) -> list[str]:
    """Sequences as out_dir/part-NNNNN.parquet: id int64, tokens list<int32>, loss_mask list<bool>.

    loss_mask[t] says whether token t is a training target (predicted from the tokens before
    it): all true but the first token, which has no context. Rows may differ in length. (In
    ensemblekd.tokens position j predicts token j + 1, so position j counts where loss_mask[j + 1].)
    """
    if shard_rows < 1:
        raise UserError("shard_rows must be at least 1")
    rows = [np.asarray(r, dtype=np.int32).reshape(-1) for r in tokens]
    paths = []
    for i, start in enumerate(range(0, len(rows), shard_rows)):
        part = rows[start:start + shard_rows]
        lengths = np.array([len(r) for r in part], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        values = np.concatenate(part) if part else np.zeros(0, np.int32)
        mask = np.ones(len(values), dtype=bool)
        mask[offsets.to_numpy()[:-1][lengths > 0]] = False
        table = pa.table({
            "id": pa.array(np.arange(first_id + start, first_id + start + len(part), dtype=np.int64)),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(values, pa.int32())),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(mask, pa.bool_())),
        })
        path = storage.join(out_dir, f"part-{i:05d}.parquet")
        storage.write_bytes_atomic(path, storage.table_to_parquet_bytes(table))
        paths.append(path)
    return paths


def prepare_markov(out: str, vocab_size: int = 512, seq_len: int = 64, train: int = 2048, val: int = 256,
                   test: int = 256, shard_rows: int = 256, seed: int = 0) -> dict[str, str]:
    """The token demo's data: markov_corpus sequences as out/{train,val,test}/part-NNNNN.parquet.

    One language (chain seed), three independent samples of it; ids are unique across splits.
    """
    paths, first_id = {}, 0
    for i, (split, n) in enumerate((("train", train), ("val", val), ("test", test))):
        tokens = markov_corpus(vocab_size, n, seq_len, seed=seed, sample_seed=seed * 3 + i + 1)
        split_dir = storage.join(out, split)
        write_token_split(split_dir, tokens, shard_rows, first_id)
        paths[split] = split_dir
        first_id += n
    return paths


# -- fit and predict ------------------------------------------------------------------------
def fit_lm(model: nn.Module, tokens: np.ndarray, epochs: int = 1, lr: float = 3e-3, batch_size: int = 32,
           seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """Next-token cross-entropy on [N, L] sequences (AdamW, cosine decay per step): fits the
    synthetic-corpus teachers and students in seconds on a CPU."""
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"fit_lm needs tokens [N, L] with L >= 2, got shape {tuple(x.shape)}")
    steps = max(epochs * -(-len(x) // batch_size), 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            batch = x[perm[i:i + batch_size]]
            logits = logits_of(model(batch))[:, :-1]
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict_lm(model: nn.Module, tokens: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """float32 logits [B, L, V] of every position, batch_size sequences per forward."""
    x = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens, dtype=torch.long)
    model.eval()
    out = [logits_of(model(x[i:i + batch_size])).float() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, x.shape[1] if x.ndim == 2 else 0, 0), np.float32)
