"""Kind gguf: a causal LM in a local .gguf file with its tokenizer read from the same file, the
built-in SmolLM2 put in place by `prepare`, fingerprinted by the file's bytes, and config mistakes
refused in one line. No Ray: the kind is exercised directly (the pipeline: tests/integration/test_gguf_pipeline.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import ensemblekd as ekd
from ensemblekd.errors import UserError
from ensemblekd.lm import load_tokenizer, vocab_hash
from ensemblekd.teachers import kind_of


def gguf_config(tmp_path, teacher: dict, **data) -> dict:
    return {"task": "token",
            "data": {"train": str(tmp_path / "d/train"), "val": str(tmp_path / "d/val"), "test": str(tmp_path / "d/test"),
                     "features": "tokens", "vocab_size": 1024, "tokenizer": "teachers", **data},
            "teachers": [{"name": "lm", **teacher}], "store": {"uri": str(tmp_path / "store")},
            "student": {"model": "ensemblekd.lm:tiny_gpt2", "kwargs": {"vocab_size": 1024}},
            "trainer": {"output_dir": str(tmp_path / "out")}}


def test_a_gguf_file_is_a_teacher_with_its_own_tokenizer(tmp_path, tiny_gguf):
    cfg = ekd.load_config(gguf_config(tmp_path, {"pretrained": str(tiny_gguf)}), check=False)
    t = cfg.teachers[0]
    kind = kind_of(t)
    assert kind.name == "gguf"                                    # inferred from the file's suffix
    model = kind.load(cfg, t)
    logits = model(torch.tensor([[5, 6, 7, 8]]))
    assert logits.shape == (1, 4, 1024) and torch.isfinite(logits).all()
    assert kind.num_parameters(model) == 1024 * 16 + 2 * (4 * 16 * 16 + 3 * 32 * 16 + 2 * 16) + 16  # 2 blocks, tied
    assert kind.tokenizer(t) == str(tiny_gguf) and len(load_tokenizer(str(tiny_gguf))) == 1024
    assert kind.artifact_bytes(cfg, t) == tiny_gguf.stat().st_size
    first = kind.fingerprint(cfg, t)
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(tiny_gguf, copy)
    with open(copy, "r+b") as f:                                  # one byte of a weight changes
        f.seek(-5, 2)
        byte = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([byte[0] ^ 1]))
    moved = ekd.load_config(gguf_config(tmp_path, {"pretrained": str(copy)}), check=False)
    assert kind.fingerprint(moved, moved.teachers[0]) != first
    assert vocab_hash(str(copy)) == vocab_hash(str(tiny_gguf))    # same vocabulary, whatever the weights


def test_prepare_puts_the_builtin_smollm2_in_place(tmp_path, smollm2_gguf):
    dest = tmp_path / "models" / "smol.gguf"
    cfg = ekd.load_config(gguf_config(tmp_path, {"pretrained": str(dest), "prepare": "smollm2"},
                                      vocab_size=49152), check=False)
    kind = kind_of(cfg.teachers[0])
    kind.check_files(cfg, cfg.teachers[0])                        # missing, but prepare will put it there
    kind.prepare(cfg, cfg.teachers[0])
    assert dest.stat().st_size == smollm2_gguf.stat().st_size > 90_000_000
    assert not list(dest.parent.glob("*.tmp-*"))


@pytest.mark.parametrize("teacher, message", [
    ({"pretrained": "m.bin", "kind": "gguf"}, "teachers.0.pretrained: teacher 'lm' of kind gguf needs a .gguf file"),
    ({"pretrained": "m.gguf", "prepare": "llama-70b"}, "teachers.0.prepare: unknown built-in model 'llama-70b'; "
                                                       "choose one of smollm2"),
    ({"pretrained": "m.gguf", "fit": {"epochs": 1}}, "teachers.0.fit: a classification head is fitted on a "
                                                    "pretrained model with task text only"),
    ({"model": "ensemblekd.lm:tiny_gpt2", "kwargs": {"vocab_size": 1024}, "fit": {}, "prepare": "smollm2"},
     "teachers.0.prepare: only used with kind: huggingface or gguf"),
])
def test_config_mistakes_are_one_line(tmp_path, teacher, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ekd.load_config(gguf_config(tmp_path, teacher, tokenizer=None), check=False)


def test_a_missing_file_without_prepare_is_refused_before_any_work(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(gguf_config(tmp_path, {"pretrained": str(tmp_path / "nope.gguf")}, tokenizer=None,
                                               prepare="markov", vocab_size=512)))
    with pytest.raises(UserError, match=r"teachers\.0\.pretrained: '.*nope\.gguf' does not exist; fix the path, "
                                        r"or add prepare: smollm2"):
        ekd.load_config(str(path))
