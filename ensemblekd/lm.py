"""Causal language models for token-level distillation.

Models are referenced from configs as 'ensemblekd.lm:NAME' with kwargs, like ensemblekd.models.
Every builder returns a `CausalLM`: forward(input_ids [B, L] long, attention_mask=None) gives
logits [B, L, V] as a plain tensor, so callers never deal with Hugging Face output objects.
The tiny builders make the model from a transformers config in code: nothing is downloaded.
The synthetic language they are fitted on in the demo is ensemblekd.data.builtin.markov_corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from ensemblekd.errors import UserError
from ensemblekd.fitting import fit_module


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


# -- fit and predict ------------------------------------------------------------------------
def next_token_loss(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each position predicting the next token; mask [B, L] (optional) marks the
    tokens that are targets (padding and the first token never are)."""
    logits = logits_of(model(tokens))[:, :-1]
    target, keep = tokens[:, 1:], None if mask is None else mask[:, 1:]
    if keep is None:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return nn.functional.cross_entropy(logits[keep], target[keep])


def fit_lm(model: nn.Module, tokens: np.ndarray, epochs: int = 1, lr: float = 3e-3, batch_size: int = 32,
           seed: int = 0, weight_decay: float = 0.0, mask: np.ndarray | None = None) -> nn.Module:
    """Next-token cross-entropy on [N, L] sequences (fitting.fit_module): fits the synthetic-corpus
    teachers and students in seconds on a CPU."""
    x = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"fit_lm needs tokens [N, L] with L >= 2, got shape {tuple(x.shape)}")
    m = None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    return fit_module(model, len(x), lambda idx: next_token_loss(model, x[idx], None if m is None else m[idx]),
                      epochs, lr, batch_size, seed, weight_decay)


@torch.no_grad()
def predict_lm(model: nn.Module, tokens: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """float32 logits [B, L, V] of every position, batch_size sequences per forward."""
    x = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens, dtype=torch.long)
    model.eval()
    out = [logits_of(model(x[i:i + batch_size])).float() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, x.shape[1] if x.ndim == 2 else 0, 0), np.float32)
