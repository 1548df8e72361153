"""A Hugging Face student usable without ensemblekd: task token's save_student (a save_pretrained
directory with the shared tokenizer, student_hf/ beside student.pt) and log_model (MLflow's
transformers flavor, a text-generation pipeline), and the atomic directory write both text and
token share (tasks.base.save_hf_student)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import ensemblekd as ekd
from ensemblekd.io import fs
from ensemblekd.lm import load_tokenizer, tiny_llama
from ensemblekd.models import save_state
from ensemblekd.tasks import get_task
from ensemblekd.tasks.base import HF_STUDENT_DIR, save_hf_student

TOKEN = get_task("token")
LLAMA = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
WORDS = ["[UNK]", "</s>", "the", "cat", "sat", "on", "a", "mat", *(f"w{i}" for i in range(56))]   # 64 ids


def token_config(tmp_path, student: dict, tokenizer, **evaluate):
    return ekd.load_config({
        "task": "token",
        "data": {"train": str(tmp_path / "d/train"), "val": str(tmp_path / "d/val"), "test": str(tmp_path / "d/test"),
                 "features": "tokens", "vocab_size": student["kwargs"].get("vocab_size", 64),
                 "tokenizer": tokenizer and str(tokenizer)},
        "teachers": [{"name": "lm", "model": "ensemblekd.lm:tiny_gpt2", "kwargs": {"vocab_size": 64},
                      "checkpoint": str(tmp_path / "lm.pt")}],
        "store": {"uri": str(tmp_path / "store")}, "student": student,
        "trainer": {"output_dir": str(tmp_path / "out")}, "evaluate": evaluate}, check=False)


def trained_student(tmp_path, vocab: int) -> tuple[dict, torch.nn.Module, str]:
    """A tiny Llama with random weights saved as distill leaves student.pt: (its config section, it, the uri)."""
    torch.manual_seed(0)
    section = {"model": "ensemblekd.lm:tiny_llama", "kwargs": {"vocab_size": vocab, **LLAMA}}
    student = tiny_llama(vocab, **LLAMA).eval()
    uri = str(tmp_path / "out" / "student.pt")
    save_state(student, uri)
    return section, student, uri


def word_tokenizer(path) -> str:
    """A tokenizer directory over WORDS: whitespace words, an end-of-sequence token and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    return str(path)


def test_save_student_writes_a_directory_transformers_loads_with_the_gguf_tokenizer(tmp_path, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    section, student, uri = trained_student(tmp_path, 1024)
    cfg = token_config(tmp_path, section, tiny_gguf, max_new_tokens=5)
    out = TOKEN.save_student(cfg, uri)
    assert out == str(tmp_path / "out" / HF_STUDENT_DIR)
    assert sorted(os.listdir(tmp_path / "out")) == ["student.pt", HF_STUDENT_DIR]    # no temporary left
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = torch.tensor([[5, 17, 300, 2, 1023, 9], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, student(ids), atol=1e-6)
    tokenizer, source = AutoTokenizer.from_pretrained(out, local_files_only=True), load_tokenizer(tiny_gguf)
    assert tokenizer.get_vocab() == source.get_vocab()
    assert tokenizer("print the value")["input_ids"] == source("print the value")["input_ids"]
    # the tokenizer's special ids fill the student's empty ones; the model in memory keeps its own
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (2, 2, 1)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.max_new_tokens == 5
    assert student.lm.config.eos_token_id is None and student.lm.generation_config.max_new_tokens is None

    generate = pipeline("text-generation", model=out)
    generated = generate("print the value", return_full_text=False, do_sample=False)[0]["generated_text"]
    prompt = tokenizer("print the value")["input_ids"]
    greedy = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert 0 < greedy.shape[1] - len(prompt) <= 5                      # max_new_tokens, from evaluate
    assert generated == tokenizer.decode(greedy[0, len(prompt):], skip_special_tokens=True)


def test_a_student_that_is_no_hf_causal_lm_saves_nothing_and_keeps_the_probability_model(tmp_path):
    section = {"model": "torch.nn:Embedding", "kwargs": {"num_embeddings": 64, "embedding_dim": 64}}
    student = torch.nn.Embedding(64, 64)
    uri = str(tmp_path / "out" / "student.pt")
    save_state(student, uri)
    cfg = token_config(tmp_path, section, word_tokenizer(tmp_path / "tok"))
    assert TOKEN.save_student(cfg, uri) is None
    assert os.listdir(tmp_path / "out") == ["student.pt"]
    from ensemblekd.tasks.token.served import generates_text

    llama = tiny_llama(64, **LLAMA)
    assert not generates_text(cfg, student) and generates_text(cfg, llama)
    assert not generates_text(token_config(tmp_path, section, None), llama)   # synthetic ids: no text to serve


def test_a_failed_save_keeps_the_earlier_directory_and_leaves_no_temporary(tmp_path):
    uri = str(tmp_path / "out" / "student.pt")
    first = save_hf_student(uri, lambda d: open(os.path.join(d, "config.json"), "w").write("1"))
    assert open(os.path.join(first, "config.json")).read() == "1"

    def half(directory):
        open(os.path.join(directory, "config.json"), "w").write("2")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        save_hf_student(uri, half)
    assert os.listdir(tmp_path / "out") == [HF_STUDENT_DIR]
    assert open(os.path.join(first, "config.json")).read() == "1"
    save_hf_student(uri, lambda d: open(os.path.join(d, "model.safetensors"), "w").write("3"))
    assert os.listdir(first) == ["model.safetensors"]                 # replaced whole: no file of the old one


def test_on_object_storage_the_directory_is_uploaded_config_last(monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    uploads, real_put = [], MemoryFileSystem.put
    monkeypatch.setattr(MemoryFileSystem, "put", lambda self, lpath, rpath, **kw: (
        uploads.append(os.path.basename(lpath)), real_put(self, lpath, rpath, **kw)))

    def write(directory):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            open(os.path.join(directory, name), "w").write(name)

    fs.write_bytes_atomic("memory://hf-student/out/student_hf/stale.bin", b"old")
    out = save_hf_student("memory://hf-student/out/student.pt", write)
    assert out == "memory://hf-student/out/student_hf"
    assert uploads[-1] == "config.json" and sorted(uploads) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(fs.file_sizes(out)) == ["config.json", "model.safetensors", "tokenizer.json"]   # stale.bin gone
    assert fs.read_bytes(fs.join(out, "tokenizer.json")) == b"tokenizer.json"


def test_log_model_logs_a_text_generation_model_mlflow_serves(tmp_path, monkeypatch, capfd):
    import mlflow
    from transformers import pipeline

    looked_up = []

    def offline(host, *args, **kwargs):
        looked_up.append(host)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    section, student, uri = trained_student(tmp_path, 64)
    cfg = token_config(tmp_path, section, word_tokenizer(tmp_path / "tok"), prompts=["the cat sat"], max_new_tokens=4)
    saved = TOKEN.save_student(cfg, uri)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("hf-student", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            capfd.readouterr()
            TOKEN.log_model(cfg, student, "student", {"ensemblekd.outputs": "probabilities"})   # as log_student
            err = capfd.readouterr().err
            model = mlflow.last_logged_model()
        assert "warning" not in err.lower(), err
        assert model is not None and model.tags["ensemblekd.outputs"] == "text"
        info = mlflow.models.get_model_info(model.model_uri)
        assert "transformers" in info.flavors and info.flavors["transformers"]["task"] == "text-generation"
        served = mlflow.pyfunc.load_model(model.model_uri)
        texts = served.predict(["the cat sat", "a mat"])
    finally:
        mlflow.set_tracking_uri(None)
    generate = pipeline("text-generation", model=saved)
    assert texts == [generate(p, do_sample=False)[0]["generated_text"] for p in ("the cat sat", "a mat")]
    # the prompt and the greedy continuation the report shows for it
    [continued] = TOKEN.continuations(cfg, {"student": student})
    assert continued["text"] and texts[0].startswith("the cat sat") and texts[0].endswith(continued["text"])
    assert looked_up == []                       # logged, loaded and run without asking any host for anything
