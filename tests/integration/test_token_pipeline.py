"""task: token — the whole pipeline (fit, label, distill, evaluate, MLflow) on the tiny LM config,
and Hugging Face teachers from local directories. (Config checks, token data, batches and every
strategy's step, which need no Ray, DeepSpeed or MLflow: tests/unit/tasks/test_token_task.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import REPO, tiny_lm_config

import ensemblekd as ekd
from ensemblekd.data.builtin import prepare_markov, write_token_split
from ensemblekd import UserError
from ensemblekd.lm import tiny_gpt2
from ensemblekd.stages.export import STUDENT_MODEL
from ensemblekd.store import Store

VOCAB = 64


# -- the whole pipeline ----------------------------------------------------------------------
@pytest.mark.integration
def test_tiny_lm_run_end_to_end(tmp_path):
    """`ensemblekd run` on configs/tiny_lm.yaml with a smaller corpus: three LM teachers fitted, labelled
    into a top-k store, a student distilled (in process: the GGUF pipeline's test runs the token task on
    Ray Train workers), evaluated and logged."""
    data = tmp_path / "data"
    prepare_markov(str(data), vocab_size=512, seq_len=32, train=256, val=64, test=64, shard_rows=64)
    overrides = {"data.train": str(data / "train"), "data.val": str(data / "val"), "data.test": str(data / "test"),
                 "data.prepare": None, "trainer.epochs": 2, "trainer.num_workers": 0, "store.uri": str(tmp_path / "store"),
                 "trainer.output_dir": str(tmp_path / "out"), "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"}
    for i in range(3):
        overrides[f"teachers.{i}.checkpoint"] = str(tmp_path / f"t{i}.pt")
        overrides[f"teachers.{i}.fit"] = {"epochs": 2, "lr": 0.003, "batch_size": 32, "seed": i}
    overrides["teachers.2.kwargs"] = {"vocab_size": 520, "n_layer": 2, "n_embd": 64, "n_head": 2}  # padded vocabulary
    config = tiny_lm_config(tmp_path, **overrides)
    proc = subprocess.run([sys.executable, "-m", "ensemblekd", "run", str(config)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outputs 520 logits per token; using the first 512" in proc.stderr
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["task"] == "token" and manifest["top_k"] == 32 and manifest["vocab_size"] == 512
    assert manifest["bytes_per_token"] < 100
    assert all(0.0 < t["val_accuracy"] < 1.0 for t in manifest["teachers"].values())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    run = mlflow.search_runs(experiment_names=["ensemblekd-tiny-lm"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1]
    assert 0.0 < run.data.metrics["test_accuracy.student"] < 1.0 and run.data.metrics["speedup_b1"] > 1.0
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{STUDENT_MODEL}")
    probs = model.predict(np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=np.int64))
    assert probs.shape == (2, 5, 512) and np.allclose(probs.sum(-1), 1.0, atol=1e-4)
    # a store labelled for one vocabulary is refused for another, before any worker starts
    again = tiny_lm_config(tmp_path, **{**overrides, "data.tokenizer": None, "data.vocab_size": 520,
                                        "data.prepare": None})
    proc = subprocess.run([sys.executable, "-m", "ensemblekd", "distill", str(again)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "labelled with vocab_size 512, the config gives 520" in proc.stderr


# -- Hugging Face teachers from local directories --------------------------------------------
def _save_hf_teacher(path: Path, vocab: dict[str, int], n_layer: int) -> None:
    """A tiny GPT-2 saved with save_pretrained, with a WordLevel tokenizer of `vocab` beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_gpt2(VOCAB, n_layer=n_layer, n_embd=16, n_head=2).lm.save_pretrained(path)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_pretrained_teachers_share_a_tokenizer_or_are_refused(tmp_path, ray_local):
    """Two Hugging Face teachers from local directories label the store, which records their shared
    tokenizer's hash; a teacher with another tokenizer is refused before anything is labelled."""
    from ensemblekd.lm import vocab_hash

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    _save_hf_teacher(tmp_path / "a", vocab, 1)
    _save_hf_teacher(tmp_path / "b", vocab, 2)
    _save_hf_teacher(tmp_path / "c", {**vocab, "w7": VOCAB, "[UNK]": 7}, 1)  # another tokenizer: ids moved
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        write_token_split(str(tmp_path / "data" / split), [rng.integers(0, VOCAB, 12) for _ in range(6)], shard_rows=3)

    def config(teachers: list[str], tokenizer: str):
        raw = yaml.safe_load((REPO / "configs" / "tiny_lm.yaml").read_text())
        raw["data"].update({s: str(tmp_path / "data" / s) for s in ("train", "val", "test")})
        raw["data"].update(prepare=None, vocab_size=VOCAB, tokenizer=tokenizer)
        raw["teachers"] = [{"name": n, "pretrained": str(tmp_path / n), "batch_size": 4} for n in teachers]
        raw["store"]["uri"] = str(tmp_path / f"store-{''.join(teachers)}")
        raw["ray"] = {"num_cpus": 2}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return ekd.load_config(path)

    cfg = config(["a", "b"], "teachers")
    result = ekd.label(cfg, progress=False)
    assert result.shards == 2 * 6
    store = Store.open(cfg.store.uri)
    assert store.manifest["vocab_hash"] == vocab_hash(str(tmp_path / "a")) != vocab_hash(VOCAB)
    assert store.manifest["teachers"]["a"]["spec"] == {"pretrained": str(tmp_path / "a")}
    text = "its tokenizer is not data.tokenizer, so it reads each row's text, and .* has none"
    with pytest.raises(UserError, match=f"^teacher 'c': {text}"):  # synthetic ids: no text to read
        ekd.label(config(["a", "c"], "teachers"), progress=False)
    with pytest.raises(UserError, match=f"^teacher 'c': {text}"):
        ekd.label(config(["c"], str(tmp_path / "a")), progress=False)
    assert not (tmp_path / "store-ac" / "manifest.json").exists()
