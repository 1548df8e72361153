"""Task text's bad inputs, each a one-line error on a small slice: texts that are null, empty or not
strings, a missing text column, a tokenizer that is missing or not the model's, a teacher whose
id2label disagrees with the data, keys of another task; and truncation counted."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

import ensemblekd as ekd
from ensemblekd.data.inputs import LABEL_NAMES_KEY, input_shards
from ensemblekd.errors import UserError
from ensemblekd.hf_text import TextClassifier, classifier, load_classifier
from ensemblekd.io import fs
from ensemblekd.tasks import TASKS

TEXT = TASKS["text"]
NAMES = [f"chapter {i}" for i in range(12)]


def write_split(path, texts, labels=None, names=NAMES):
    table = pa.table({"id": pa.array(np.arange(len(texts)), pa.int64()), "text": texts,
                      "y": pa.array(labels if labels is not None else [0] * len(texts), pa.int64())})
    if names:
        table = table.replace_schema_metadata({LABEL_NAMES_KEY: json.dumps(names).encode()})
    path.mkdir(parents=True, exist_ok=True)
    fs.write_bytes_atomic(str(path / "part-00000.parquet"), fs.table_to_parquet_bytes(table))
    return path


def text_config(tmp_path, **data):
    splits = {s: str(write_split(tmp_path / s, ["Return the sum of two numbers.", "Open a file."])) for s in
              ("train", "val", "test")}
    return ekd.load_config({
        "task": "text", "data": {**splits, **data},
        "teachers": [{"name": "t", "kind": "sklearn", "checkpoint": str(tmp_path / "t.skops")}],
        "store": {"uri": str(tmp_path / "store")},
        "student": {"model": "ensemblekd.hf_text:classifier", "kwargs": {"num_classes": 12, "tokenizer": "x"}},
    }, check=False)


@pytest.mark.parametrize("texts, message", [
    (["fine", None], "has a null or empty text in 1 row(s) (the first is row 1); drop or fill those rows"),
    (["fine", "   "], "has a null or empty text in 1 row(s) (the first is row 1)"),
    ([1, 2], "text column 'text' has type int64; it must hold one string per row"),
])
def test_bad_texts_are_one_line_errors(tmp_path, texts, message):
    cfg = text_config(tmp_path)
    write_split(tmp_path / "bad", texts)
    shard = input_shards(str(tmp_path / "bad"))[0].signature()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        TEXT.read_inputs(cfg, shard)
    assert "\n" not in str(err.value)


def test_a_missing_text_column_names_the_key(tmp_path):
    cfg = text_config(tmp_path, text_column="body")
    with pytest.raises(UserError, match="no column 'body'.*set data.text_column"):
        TEXT.check_inputs(cfg, input_shards(cfg.data.train), 12)


def test_keys_of_another_task_are_refused(tmp_path):
    with pytest.raises(UserError, match="data.text_column: only used with task: text"):
        given = text_config(tmp_path).to_dict()
        ekd.load_config({**given, "task": "classification", "data": {**given["data"], "text_column": "body"},
                         "student": {"model": "ensemblekd.models:mlp"}}, check=False)
    with pytest.raises(UserError, match="data.features: task text reads data.text_column"):
        text_config(tmp_path, features="x2")


def test_a_missing_tokenizer_directory_is_named(tmp_path):
    with pytest.raises(UserError, match="student.kwargs.tokenizer: tokenizer directory '.*nowhere' does not exist"):
        classifier(12, str(tmp_path / "nowhere"), config={"num_hidden_layers": 1})


def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path, tiny_bert, minilm_dir):
    from transformers import AutoModelForSequenceClassification, BertConfig

    small = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                       intermediate_size=16, num_labels=12)
    AutoModelForSequenceClassification.from_config(small).save_pretrained(tmp_path / "small")
    with pytest.raises(UserError, match="has 30522 tokens but the model's embeddings hold 100; it is not this "
                                        "model's tokenizer"):
        load_classifier(str(tmp_path / "small"), "teachers.0", tokenizer=str(minilm_dir))
    with pytest.raises(UserError, match="teachers.0: tokenizer directory '.*small' holds no tokenizer"):
        load_classifier(str(tmp_path / "small"), "teachers.0")  # saved without its tokenizer


def test_a_teacher_whose_id2label_disagrees_is_refused(tmp_path, tiny_bert):
    cfg = text_config(tmp_path)
    model = load_classifier(str(tiny_bert["classifier"]), "teachers.0", max_length=16)
    model.model.config.id2label = {i: f"other {i}" for i in range(12)}
    inputs = TEXT.read_inputs(cfg, input_shards(cfg.data.train)[0].signature())
    with pytest.raises(UserError, match="teacher 't': its id2label names the classes"):
        TEXT.label_shard(model, inputs, cfg, cfg.teachers[0], "cpu", "train shard 0")
    model.model.config.id2label = dict(enumerate(NAMES))
    _, entry = TEXT.label_shard(model, inputs, cfg, cfg.teachers[0], "cpu", "train shard 0")
    assert entry["num_classes"] == 12 and entry["truncated"] == 0


def test_long_texts_are_cut_and_counted(tiny_bert):
    model = load_classifier(str(tiny_bert["classifier"]), "teachers.0", max_length=8)
    texts = ["short one", "a much longer text that runs well past eight word pieces of the tokenizer"]
    assert isinstance(model, TextClassifier) and model.count_truncated(texts) == 1
    assert model.encode(texts)["input_ids"].shape == (2, 8)
    with torch.no_grad():
        assert model(texts).shape == (2, 12)


def test_a_students_word_embeddings_start_from_a_pca_of_another_models(tiny_bert, minilm_dir):
    from transformers import AutoModel

    from ensemblekd.hf_text import pca_embeddings

    config = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    student = classifier(12, str(minilm_dir), config=config, embeddings_from=str(tiny_bert["backbone"]))
    words = student.model.get_input_embeddings().weight.detach()
    source = AutoModel.from_pretrained(tiny_bert["backbone"]).get_input_embeddings().weight.detach()
    centred = source - source.mean(0)
    # a full-rank linear map of the source's (centred) embeddings, the one pca_embeddings computes
    assert words.shape == (30522, 16)
    assert torch.allclose(words, pca_embeddings(str(tiny_bert["backbone"]), 30522, 16) * 5 * 0.02)
    kept = torch.linalg.lstsq(centred, words).solution
    assert torch.linalg.matrix_rank(kept) == 16
    with pytest.raises(UserError, match="embeds 30522 tokens in 32 dimensions; the student's tokenizer has 30522 and "
                                        "hidden_size 64"):
        classifier(12, str(minilm_dir), config={**config, "hidden_size": 64, "intermediate_size": 64},
                   embeddings_from=str(tiny_bert["backbone"]))
