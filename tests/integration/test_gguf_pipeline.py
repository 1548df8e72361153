"""A GGUF teacher through the whole pipeline on a user's own text: `ensemblekd run` with a 1-layer GGUF
LM (SmolLM2's tokenizer cut to 1,024 tokens, tests/gguf_models.py) and a fitted GPT-2 teaching a
smaller GPT-2 on a few pydoc topics given as JSON Lines (data.text), with the student trained alone
beside it (evaluate.baseline) and greedy continuations in the report; the store uses the ranked codec.
The student starts from the GGUF teacher (student.init: 1 of its 2 blocks, half its MLP, 12 of 16
hidden channels), so the report also has the pruned model before training. A third teacher, a
1-block Llama with a "▁" tokenizer of its own (tests/tiny_tokenizers.py), reads each row's text and
teaches across tokenizers (docs/cross-tokenizer.md): it is compared in bits per byte. The real SmolLM2 config
(configs/smollm2.yaml) is checked in tests/unit/config; its run is measured in docs/language-models.md."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml

from ensemblekd.data.text import pydoc_documents


@pytest.mark.integration
def test_gguf_teacher_on_a_users_text_end_to_end(tmp_path, tiny_gguf):
    from tiny_tokenizers import fast_tokenizer, metaspace_tokenizer, tiny_llama_dir

    other = tiny_llama_dir(tmp_path / "other", fast_tokenizer(metaspace_tokenizer()))
    docs = pydoc_documents()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, picked in (("train", docs[0:4]), ("val", docs[6:7]), ("test", docs[8:10])):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _, text in picked))
    cfg = {
        "task": "token",
        "data": {**{s: str(tmp_path / "tokens" / s) for s in ("train", "val", "test")}, "features": "tokens",
                 "vocab_size": 1024, "tokenizer": "teachers", "seq_len": 64,
                 "text": {s: str(corpus / f"{s}.jsonl") for s in ("train", "val", "test")}},
        "teachers": [
            {"name": "tiny_gguf", "pretrained": str(tiny_gguf), "batch_size": 16},
            {"name": "gpt2", "model": "ensemblekd.lm:tiny_gpt2", "kwargs": {"vocab_size": 1024, "n_layer": 1,
                                                                            "n_embd": 32, "n_positions": 64},
             "fit": {"epochs": 3, "lr": 0.01, "batch_size": 16}, "checkpoint": str(tmp_path / "gpt2.pt")},
            {"name": "other", "pretrained": str(other), "batch_size": 16},   # its own tokenizer
        ],
        "store": {"uri": str(tmp_path / "store"), "top_k": 16, "codec": "ranked"},
        "student": {"init": {"teacher": "tiny_gguf", "layers": 1, "intermediate_size": 0.5, "hidden_size": 12,
                             "calibration": 8}},
        "distill": {"temperature": 1.0, "alpha": 0.0},
        "trainer": {"num_workers": 2, "epochs": 1, "batch_size": 16, "lr": 0.01, "output_dir": str(tmp_path / "out")},
        "evaluate": {"baseline": True, "latency_tokens": 8, "warmup": 0, "repeats": 1, "max_new_tokens": 4,
                     "prompts": ["The for statement"]},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "gguf"},
        "ray": {"num_cpus": 2},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "ensemblekd", "run", str(config)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if "warning" in line.lower() or "error" in line.lower()
             or "de-quantizing" in line]
    assert not noise, noise
    assert "WARNING" not in proc.stdout, proc.stdout[:2000]     # e.g. DeepSpeed's accelerator notice on save_pretrained
    assert "Loading weights" not in proc.stderr                 # one bar per stage: transformers' own are off
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 1024 and manifest["teachers"]["tiny_gguf"]["spec"] == {"pretrained": str(tiny_gguf)}
    assert manifest["codec"] == "ranked" and list(manifest["own_tokenizers"]) == ["other"]
    assert manifest["teachers"]["other"]["vocab_map"]["shapes"]["map"] == [len(fast_tokenizer(metaspace_tokenizer()))]
    theirs = next((tmp_path / "store" / "train" / "other").glob("*.parquet"))
    assert {"own_tokens", "byte_ends"} <= set(pq.read_schema(theirs).names)
    shard = next((tmp_path / "store" / "train" / "gpt2").glob("*.parquet"))
    assert "topk_codes" in pq.read_schema(shard).names
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"tiny_gguf", "gpt2", "other", "ensemble", "student", "student_alone", "pruned"}
    assert rows["ensemble"]["params"] == rows["tiny_gguf"]["params"] + rows["gpt2"]["params"]   # not 'other'
    assert rows["other"]["perplexity"] is None and 0 < rows["other"]["bits_per_byte"] < rows["other"]["bits_per_char"]
    assert rows["other"]["tokens_per_s"] > 0
    rows.pop("other")  # a tokenizer of its own: no perplexity, no continuation
    assert rows["pruned"]["params"] == rows["student"]["params"] == report["init"]["params"]
    assert report["init"]["layers"] in ([0], [1]) and report["init"]["widths"] == {"intermediate_size": 16,
                                                                                    "hidden_size": 12}
    for r in rows.values():
        assert 1.0 < r["perplexity"] < 1e6 and math.isclose(r["perplexity"], math.exp(r["nll"]), rel_tol=1e-6)
        assert r["tokens_per_s"] > 0 and 0 < r["bits_per_byte"] < 20
    # the fitted GPT-2 beats a uniform guess over 1,024 ids; the GGUF file's random weights do not
    assert rows["gpt2"]["perplexity"] < 1024 < rows["tiny_gguf"]["perplexity"]
    assert "gap_closed" in report["summary"] and report["summary"]["perplexity_retained"] > 0
    said = {c["model"] for c in report["continuations"]}
    assert said == set(rows) and all(c["prompt"] == "The for statement" for c in report["continuations"])
    table = (tmp_path / "out" / "report" / "table.txt").read_text()
    assert "ppl" in table and "greedy continuation of 'The for statement':" in table
    assert "student trained alone" in table and "student started from tiny_gguf: 1 of 2 blocks" in table
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    run = mlflow.search_runs(experiment_names=["gguf"], output_format="list", filter_string="tags.mlflow.parentRunId IS NULL")[0]
    assert run.data.metrics["test_perplexity.student"] == pytest.approx(rows["student"]["perplexity"])
    assert run.data.params["init.kept_hidden_size"] == "12"
    children = mlflow.search_runs(experiment_names=["gguf"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert [c.info.run_name for c in children] == ["baseline"]
