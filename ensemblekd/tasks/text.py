"""task: text — a raw text per row, one label, C logits per teacher.

Task classification with another input: a row's input is the string in `data.text_column`, and
every model takes a batch of texts (list[str]) and tokenizes them itself. Each teacher has its own
tokenizer (a Hugging Face classifier's, a TF-IDF pipeline's vectorizer), and so has the student
('ensemblekd.hf_text:classifier'). Targets, the store's codec, every weighting rule, strategy and
divergence, and the evaluation are classification's, unchanged.

Class names come from the input files: the Parquet schema metadata key `ensemblekd.label_names`
(a JSON list; the built-in `docstrings` set has it), else LABEL_0 ... The student is saved beside
student.pt as a Hugging Face directory (`student_hf/`: weights, config with id2label, tokenizer),
and served through MLflow as a model that takes texts and returns class probabilities.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import numpy as np
import torch

from ensemblekd.config import Config
from ensemblekd.data.inputs import LABEL_NAMES_KEY, InputShard, input_shards, read_footer, texts_to_numpy
from ensemblekd.errors import UserError
from ensemblekd.models import load_student
from ensemblekd.store import Store
from ensemblekd.tasks.base import HF_STUDENT_DIR, save_hf_student
from ensemblekd.tasks.classification import Classification


def label_names(shard: dict[str, Any] | InputShard) -> list[str] | None:
    """The class names an input file declares (schema metadata LABEL_NAMES_KEY), if any."""
    shard = shard if isinstance(shard, InputShard) else InputShard.of(shard)
    meta = (shard.metadata or read_footer(shard.uri)[2]).schema.to_arrow_schema().metadata or {}
    return json.loads(meta[LABEL_NAMES_KEY]) if LABEL_NAMES_KEY in meta else None


@functools.lru_cache(maxsize=8)
def declared_names(train: str) -> list[str] | None:
    """The class names the train split's first file declares (label_names), read once per process."""
    shards = input_shards(train, "data.train")
    return label_names(shards[0]) if shards else None


class Text(Classification):
    name = "text"
    own_keys = ("data.text_column",)
    stores_features = False
    input_key = "data.text_column"
    to_inputs = staticmethod(texts_to_numpy)

    def input_column(self, cfg: Config) -> str:
        return cfg.data.text_column

    def as_inputs(self, x: np.ndarray) -> list[str]:
        return x.tolist()

    def on_device(self, batch: list[str], device) -> list[str]:
        return batch                     # each model tokenizes onto its own device

    def check_config(self, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.data.features != "x":
            raise UserError("data.features: task text reads data.text_column (a string per row); remove features")

    def label_names(self, cfg: Config, num_classes: int) -> list[str]:
        """The class names of the train split's first file, or LABEL_<i>."""
        names = declared_names(cfg.data.train)
        if names is not None and len(names) != num_classes:
            raise UserError(f"data.train: its {LABEL_NAMES_KEY.decode()} name {len(names)} classes but the teachers "
                            f"output {num_classes}; fix the metadata or the teachers")
        return names or [f"LABEL_{i}" for i in range(num_classes)]

    # -- label -------------------------------------------------------------------------------
    def label_shard(self, model, inputs, cfg: Config, teacher, device: str, where: str):
        names, declared = getattr(model, "label_names", None), declared_names(cfg.data.train)
        if names is not None and declared is not None and names != declared:
            raise UserError(f"teacher '{teacher.name}': its id2label names the classes {names}, the data "
                            f"{declared}; a teacher must predict the data's classes in the data's order")
        data, entry = super().label_shard(model, inputs, cfg, teacher, device, where)
        count = getattr(model, "count_truncated", None)
        return data, {**entry, **({"truncated": int(count(inputs[1].tolist()))} if count else {})}

    # -- distill -------------------------------------------------------------------------------
    def preflight(self, cfg: Config, store: Store, student) -> None:
        super().preflight(cfg, store, student)
        count = getattr(student, "count_truncated", None)
        if count is not None:
            texts = np.concatenate([self.read(cfg, s, label=False)[1] for s in store.inputs("train")]).tolist()
            cut = count(texts)
            if cut:
                print(f"distill: {cut} of {len(texts)} train texts are longer than the student's max_length "
                      f"({student.max_length} tokens) and are cut to it", file=sys.stderr, flush=True)

    def save_student(self, cfg: Config, student_uri: str) -> str | None:
        """A Hugging Face student is also saved with save_pretrained (weights, config with id2label,
        tokenizer) in HF_STUDENT_DIR next to student.pt."""
        student: Any = load_student(cfg.student, student_uri)  # a TextClassifier, when it has save_pretrained
        save = getattr(student, "save_pretrained", None)
        if save is None:
            return None
        names = self.label_names(cfg, student.num_labels)
        return save_hf_student(student_uri, lambda directory: save(directory, names))

    # -- evaluate and serve --------------------------------------------------------------------
    def latency_batch(self, x: list[str], batch: int) -> list[str]:
        return (x * -(-batch // len(x)))[:batch]

    def log_model(self, cfg: Config, student: Any, name: str, tags: dict[str, str]) -> None:
        """An MLflow pyfunc model over the student's save_pretrained directory (text_served.py, a
        model from code): a JSON of texts in, one probability column per class out."""
        import tempfile
        import warnings

        import mlflow
        import pandas as pd
        from mlflow.models import infer_signature

        if not hasattr(student, "save_pretrained"):
            raise UserError("student.model: task text serves a Hugging Face student (ensemblekd.hf_text:classifier); "
                            "for another student set tracking.log_model: false")
        _, x, _ = self.read_split(cfg, "val", label=False)
        texts = x[:4].tolist()
        names = self.label_names(cfg, student.num_labels)
        with torch.no_grad():
            probabilities = torch.softmax(student(texts).float(), dim=-1).numpy()
        example = pd.DataFrame({"text": texts})
        signature = infer_signature(example, pd.DataFrame(probabilities, columns=names))
        with tempfile.TemporaryDirectory() as tmp:
            student.save_pretrained(tmp, names)
            with warnings.catch_warnings():  # pandas' advice on MLflow's own code: not the user's to act on
                warnings.filterwarnings("ignore", message=".*Operation with range is deprecated.*")
                mlflow.pyfunc.log_model(name=name, artifacts={"model": tmp}, signature=signature, input_example=example,
                                        python_model=os.path.join(os.path.dirname(__file__), "text_served.py"),
                                        tags=tags, pip_requirements=["torch", "transformers", "pandas"])


__all__ = ["HF_STUDENT_DIR", "LABEL_NAMES_KEY", "Text", "label_names"]
