"""The student.init stage on task text, in process: a tiny BERT classifier teacher is measured on
the docstrings train split and written as an ordinary Hugging Face directory; the directory is
reused while nothing changed, and a teacher that cannot be pruned is refused without touching it."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ensemblekd as ekd
from ensemblekd.errors import UserError
from ensemblekd.hf_text import TextClassifier
from ensemblekd.models import build_student
from ensemblekd.stages.student_init import RECORD, init_student
from ensemblekd.teachers import kind_of


def config(tmp_path, data, bert, **init):
    return ekd.load_config({
        "task": "text",
        "data": {s: str(data / s) for s in ("train", "val", "test")},
        "teachers": [{"name": "bert", "kind": "huggingface", "pretrained": str(bert), "max_length": 32},
                     {"name": "tfidf", "kind": "sklearn", "model": "ensemblekd.models:tfidf_logistic", "fit": {},
                      "checkpoint": str(tmp_path / "tfidf.skops")}],
        "store": {"uri": str(tmp_path / "store")},
        "student": {"init": {"teacher": "bert", "calibration": 12, "batch_size": 4, **init},
                    "kwargs": {"max_length": 32}},
        "trainer": {"num_workers": 0, "output_dir": str(tmp_path / "out")},
    })


TEXTS = ["Return the number of items in a container.", "Open a socket connection to the given host."]


def test_a_student_with_nothing_removed_classifies_as_its_teacher_does(tmp_path, docstrings_data, tiny_bert):
    cfg = config(tmp_path, docstrings_data, tiny_bert["classifier"])
    record = init_student(cfg, progress=False)
    assert record["layers"] == [0, 1] and record["widths"] == {} and record["params"] == record["teacher_params"]
    assert len(record["influence"]) == 2 and record["calibration_tokens"] > 12
    student = build_student(cfg.student)
    teacher = kind_of(cfg.teachers[0]).load(cfg, cfg.teachers[0])
    assert isinstance(student, TextClassifier)
    with torch.no_grad():
        assert torch.equal(student(TEXTS), teacher(TEXTS))


def test_the_directory_is_reused_until_the_spec_changes_and_a_refusal_keeps_it(tmp_path, docstrings_data, tiny_bert):
    cfg = config(tmp_path, docstrings_data, tiny_bert["classifier"], layers=1, intermediate_size=0.25)
    init_student(cfg, progress=False)
    weights = os.path.join(cfg.student.init.path, "model.safetensors")
    first = os.stat(weights).st_mtime_ns
    assert init_student(cfg, progress=False)["widths"] == {"intermediate_size": 16}
    assert os.stat(weights).st_mtime_ns == first                       # current: not written again
    changed = config(tmp_path, docstrings_data, tiny_bert["classifier"], layers=1, intermediate_size=0.5)
    assert init_student(changed, progress=False)["widths"] == {"intermediate_size": 32}
    refused = config(tmp_path, docstrings_data, tiny_bert["classifier"], layers=1, hidden_size=16)
    with pytest.raises(UserError, match="^student.init.hidden_size: a bert model keeps its hidden_size") as exc:
        init_student(refused, progress=False)
    assert "\n" not in str(exc.value)
    with open(os.path.join(cfg.student.init.path, RECORD)) as f:        # what was written stays whole
        assert json.load(f)["widths"] == {"intermediate_size": 32}
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p]
