"""Kind `huggingface`: a causal LM saved with save_pretrained in a local directory (`pretrained`),
read with from_pretrained and nothing downloaded; its tokenizer comes with it (task token)."""

from __future__ import annotations

import hashlib
import json
import os

from torch import nn

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.teachers.base import TeacherKind, key_of

WEIGHT_FILES = (".json", ".safetensors", ".bin", ".model")  # what the fingerprint reads of the directory


class HuggingFaceKind(TeacherKind):
    name = "huggingface"
    tasks = ("token",)

    def check(self, cfg: Config, t: TeacherConfig) -> None:
        key = key_of(cfg, t)
        if t.pretrained is None:
            raise UserError(f"{key}.pretrained: teacher '{t.name}' of kind {self.name} needs pretrained: a local "
                            "model directory (save_pretrained)" + (" or .gguf file" if self.name == "gguf" else ""))
        if t.model is not None:
            raise UserError(f"{key}: teacher '{t.name}' needs either model (+ checkpoint or fit) or pretrained")
        if t.checkpoint or t.fit or t.kwargs:
            raise UserError(f"{key}.pretrained: a pretrained model brings its own weights; "
                            "remove checkpoint, fit and kwargs")
        super().check(cfg, t)

    def check_files(self, cfg: Config, t: TeacherConfig) -> None:
        assert t.pretrained is not None  # check() requires it
        if not fs.exists(os.path.join(t.pretrained, "config.json")):
            raise UserError(f"{key_of(cfg, t)}.pretrained: '{t.pretrained}' is not a Hugging Face model directory "
                            "(no config.json); save one with save_pretrained")

    def artifact(self, cfg: Config, t: TeacherConfig) -> str:
        assert t.pretrained is not None  # check() requires it
        return t.pretrained

    def spec(self, t: TeacherConfig) -> dict:
        return {"pretrained": t.pretrained}

    def fingerprint(self, cfg: Config, t: TeacherConfig) -> str:
        """sha256 over the spec and the directory's config, tokenizer and weight files."""
        h = hashlib.sha256(json.dumps(self.spec(t), sort_keys=True).encode())
        assert t.pretrained is not None  # check() requires it
        for name in sorted(os.listdir(t.pretrained)):
            if name.endswith(WEIGHT_FILES):
                h.update(name.encode())
                h.update(fs.read_bytes(os.path.join(t.pretrained, name)))
        return h.hexdigest()[:16]

    def artifact_bytes(self, cfg: Config, t: TeacherConfig) -> int:
        assert t.pretrained is not None  # check() requires it
        return sum(os.path.getsize(os.path.join(t.pretrained, f)) for f in os.listdir(t.pretrained))

    def load(self, cfg: Config, t: TeacherConfig) -> nn.Module:
        from ensemblekd.lm import from_pretrained

        assert t.pretrained is not None  # check() requires it
        return from_pretrained(t.pretrained).eval()

    def tokenizer(self, t: TeacherConfig) -> str | None:
        return t.pretrained
