"""Task text end to end on the built-in docstrings set: every teacher kind that reads text (a Hugging
Face classifier as a user saved it, a Hugging Face backbone with a head fitted here, a TF-IDF
pipeline fitted here, a GGUF causal LM with a head on its last token fitted here) labelled by Ray actors, a Hugging Face student trained by two Ray Train
workers with DeepSpeed, evaluated and logged to MLflow; its save_pretrained directory loaded by
transformers' pipeline; `export`'s serve line run as printed, answering texts with the student's
own probabilities. Tiny models with MiniLM's real tokenizer: one run, shared by the module."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch
from conftest import free_port, stop_group

import ensemblekd as ekd
from ensemblekd.data.inputs import read_split, texts_to_numpy
from ensemblekd.models import load_student
from ensemblekd.tasks.text import HF_STUDENT_DIR
from ensemblekd.testing import write_config

pytestmark = pytest.mark.integration
NAME = "docstrings-student"


@pytest.fixture(scope="module")
def text_config(tmp_path_factory, tiny_bert, minilm_dir, docstrings_data, tiny_gguf) -> dict:
    tmp = tmp_path_factory.mktemp("text")
    data = docstrings_data
    return {
        "task": "text",
        "data": {"train": str(data / "train"), "val": str(data / "val"), "test": str(data / "test")},
        "teachers": [
            {"name": "user_bert", "kind": "huggingface", "pretrained": str(tiny_bert["classifier"]), "max_length": 32},
            {"name": "head_bert", "pretrained": str(tiny_bert["backbone"]), "train_layers": 1, "max_length": 32,
             "fit": {"epochs": 1, "batch_size": 64, "lr": 0.003}, "checkpoint": str(tmp / "teachers" / "head_bert")},
            {"name": "tfidf", "kind": "sklearn", "model": "ensemblekd.models:tfidf_logistic", "kwargs": {"C": 3.0},
             "fit": {}, "checkpoint": str(tmp / "teachers" / "tfidf.skops")},
            {"name": "lm_head", "pretrained": str(tiny_gguf), "max_length": 32,   # a causal LM read on its last token
             "fit": {"epochs": 1, "batch_size": 64, "lr": 0.003}},
        ],
        "store": {"uri": str(tmp / "store")},
        "student": {"model": "ensemblekd.hf_text:classifier", "kwargs": {
            "num_classes": 12, "tokenizer": str(minilm_dir), "max_length": 32,
            "config": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                       "max_position_embeddings": 32}}},
        "distill": {"temperature": 2.0},
        "trainer": {"num_workers": 2, "epochs": 1, "batch_size": 64, "output_dir": str(tmp / "out")},
        "evaluate": {"warmup": 1, "repeats": 2},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "text"},
        "ray": {"num_cpus": 2},
        "_tmp": str(tmp),
    }


@pytest.fixture(scope="module")
def text_run(text_config, ray_local):
    cfg = {k: v for k, v in text_config.items() if k != "_tmp"}
    path = write_config(text_config["_tmp"], cfg)
    return ekd.load_config(path), ekd.run(path, progress=False)


def test_every_text_teacher_kind_labels_and_the_student_is_evaluated(text_run):
    cfg, result = text_run
    rows = {r.model: r for r in result.evaluation.rows}
    assert set(rows) == {"user_bert", "head_bert", "tfidf", "lm_head", "ensemble", "student"}
    store = ekd.open_store(cfg.store.uri)
    assert store.task == "text" and store.num_classes == 12
    _, _, y = read_split(cfg.data.test, "text", "y", "id", texts_to_numpy, "data.text_column")
    for name in ("user_bert", "head_bert", "tfidf", "lm_head"):
        assert store.targets(name, "test").logits.shape == (len(y), 12)
    # the head fitted here learnt something; the untrained user classifier did not have to
    assert rows["tfidf"].accuracy > 0.2 and rows["head_bert"].accuracy > 1 / 12
    # the report's latency includes tokenization: every model was timed on texts
    assert all(rows[n].p50_ms_b64 > 0 for n in rows)
    assert rows["tfidf"].params > 0 and rows["student"].params < rows["user_bert"].params * 100


def test_the_saved_student_loads_with_a_transformers_pipeline(text_run):
    from transformers import AutoModelForSequenceClassification, pipeline

    cfg, result = text_run
    directory = os.path.join(cfg.trainer.output_dir, HF_STUDENT_DIR)
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    assert model.config.id2label[0] == "text processing" and model.config.num_labels == 12
    classify = pipeline("text-classification", model=directory, top_k=None, device="cpu")
    texts = ["Return a copy of the string with leading whitespace removed.", "Open a socket connection."]
    got = classify(texts, truncation=True)
    student = load_student(cfg.student, result.student)
    with torch.no_grad():
        want = torch.softmax(student(texts), -1).numpy()
    for row, probabilities in zip(got, want):
        by_name = {r["label"]: r["score"] for r in row}
        np.testing.assert_allclose([by_name[model.config.id2label[i]] for i in range(12)], probabilities, atol=1e-5)


def test_export_serves_texts_with_the_line_it_prints(text_run, tmp_path):
    cfg, result = text_run
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri}
    exported = subprocess.run([sys.executable, "-m", "ensemblekd", "export", result.run_id, "--name", NAME],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    line = next(s.strip().removeprefix("serve it:").strip() for s in exported.stdout.splitlines() if "models serve" in s)
    port = free_port()
    line = line.replace(" -p 5001", f" -p {port}")
    # run as printed, from a shell whose PATH lacks the virtual environment (not activated)
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    bare["PATH"] = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                   if os.path.dirname(sys.executable) != p)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", line], env=bare, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"`{shlex.quote(line)}` exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        texts = ["Return the number of items in a container.", "Create a new thread and start it."]
        response = requests.post(f"{url}/invocations", json={"dataframe_split": {
            "columns": ["text"], "data": [[t] for t in texts]}}, timeout=60)
        assert response.status_code == 200, response.text[:2000]
        got = response.json()["predictions"]
        student = load_student(cfg.student, result.student)
        with torch.no_grad():
            want = torch.softmax(student(texts), -1).numpy()
        names = list(got[0])
        assert len(names) == 12 and names[0] == "text processing"
        np.testing.assert_allclose([[row[n] for n in names] for row in got], want, atol=1e-5)
    finally:
        stop_group(proc)


def test_a_student_cut_from_a_bert_teacher_is_distilled_from_the_same_store(text_run, text_config):
    """student.init on the run's store: the user's 2-block BERT classifier keeps 1 block and half its
    MLP, is distilled, and the report shows it before (pruned) and after training."""
    import mlflow

    cfg, _ = text_run
    out = os.path.join(text_config["_tmp"], "pruned")
    changed = {k: v for k, v in text_config.items() if k != "_tmp"}
    changed["student"] = {"init": {"teacher": "user_bert", "layers": 1, "choose": "spaced", "intermediate_size": 0.5,
                                   "calibration": 16},
                          "kwargs": {"num_classes": 12, "max_length": 32}}
    changed["trainer"] = {**changed["trainer"], "output_dir": out}
    changed["teachers"] = [{**t, "checkpoint": os.path.join(cfg.trainer.output_dir, "teachers", t["name"])}
                           if "fit" in t and "checkpoint" not in t else t
                           for t in changed["teachers"]]   # a teacher fitted by the run stays where the run put it
    path = write_config(text_config["_tmp"], changed, name="pruned.yaml")
    distilled = ekd.distill(path, progress=False)
    pruned_dir = os.path.join(out, "student_init")
    record = json.loads(open(os.path.join(pruned_dir, "init.json")).read())
    assert record["layers"] == [0] and record["widths"] == {"intermediate_size": 32} and record["teacher_layers"] == 2
    assert record["calibration_tokens"] > 16 and record["params"] < record["teacher_params"]
    hf = json.loads(open(os.path.join(pruned_dir, "config.json")).read())
    assert (hf["num_hidden_layers"], hf["intermediate_size"], len(hf["id2label"])) == (1, 32, 12)
    assert os.path.isfile(os.path.join(pruned_dir, "tokenizer.json"))        # the teacher's, beside the weights
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(distilled.run_id)
    assert run.data.params["init.kept_layers"] == "0" and run.data.params["init.kept_intermediate_size"] == "32"
    assert float(run.data.params["trainer.lr"]) == 6e-4                        # a pruned student's default
    found = ekd.evaluate(path, repeats=0)
    rows = {r.model: r for r in found.rows}
    assert rows["pruned"].role == "pruned" and rows["pruned"].params == rows["student"].params == record["params"]
    assert rows["pruned"].accuracy != rows["student"].accuracy or rows["pruned"].kl != rows["student"].kl
    assert "student started from user_bert: 1 of 2 blocks (kept 0), intermediate_size 32" in found.table
