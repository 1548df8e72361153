"""task: token — config checks, token data, batches aligned with the store, every strategy's
step, and the whole pipeline (fit, label, distill, evaluate, MLflow) on the tiny LM config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ensemblekd import tracking
from ensemblekd.config import load_config
from ensemblekd.data import InputShard, read_token_shard
from ensemblekd.errors import UserError
from ensemblekd.lm import prepare_markov, tiny_gpt2, write_token_split
from ensemblekd.losses import IGNORE
from ensemblekd.store import Store
from ensemblekd.token_pipeline import TokenBatch, iter_batches, make_batch, train_step
from ensemblekd.tokens import encode_token_shard, topk_targets
from ensemblekd.weighting import WEIGHTINGS, build_strategy

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


def tiny_lm_config(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tiny_lm.yaml").read_text())
    for key, value in changes.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    out = tmp_path / "config.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


# -- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"data.vocab_size": None}, "data.vocab_size: task token needs"),
    ({"distill.mix_space": "logit"}, "use mix_space: prob"),
    ({"task": "classification"}, "'markov' is a data set for task token"),
    ({"teachers.0.pretrained": "some/dir"}, "needs either model"),
])
def test_token_config_mistakes_are_one_line(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        load_config(tiny_lm_config(tmp_path, **change), check=False)


def test_the_tiny_lm_config_validates():
    cfg = load_config(ROOT / "configs" / "tiny_lm.yaml", check=False)
    assert cfg.task == "token" and cfg.data.vocab_size == 512 and cfg.store.top_k == 32


# -- data ------------------------------------------------------------------------------------
def test_token_shards_pad_right_and_mask_the_first_token_and_padding(tmp_path):
    write_token_split(str(tmp_path / "s"), [np.array([5, 6, 7, 8]), np.array([9, 10])])
    cfg = load_config(tiny_lm_config(tmp_path), check=False)
    shard = InputShard(str(tmp_path / "s" / "part-00000.parquet"), 2, 0, 0)
    ids, tokens, lengths, mask = read_token_shard(shard, cfg.data)
    assert ids.tolist() == [0, 1] and lengths.tolist() == [4, 2]
    assert tokens.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert mask.tolist() == [[False, True, True, True], [False, True, False, False]]


def test_a_given_loss_mask_is_honoured_and_bad_ids_are_refused(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": [0], "tokens": [[1, 2, 3, 4]], "loss_mask": [[True, True, False, True]]}), path)
    cfg = load_config(tiny_lm_config(tmp_path), check=False)
    _, _, _, mask = read_token_shard(InputShard(str(path), 1, 0, 0), cfg.data)
    assert mask.tolist() == [[False, True, False, True]]
    pq.write_table(pa.table({"id": [0], "tokens": [[1, 600]]}), path)
    with pytest.raises(UserError, match="outside data.vocab_size 512"):
        read_token_shard(InputShard(str(path), 1, 0, 0), cfg.data)


# -- batches ---------------------------------------------------------------------------------
def synthetic_store(tmp_path: Path, lengths: list[int], teachers: int = 2, k: int = 4):
    """An input shard and each teacher's top-k shard (random logits), as label writes them."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, VOCAB, n).astype(np.int32) for n in lengths]
    write_token_split(str(tmp_path / "in"), rows)
    cfg = load_config(tiny_lm_config(tmp_path, **{"data.vocab_size": VOCAB, "store.top_k": k}), check=False)
    store = Store.open(str(tmp_path / "store"), create=True)
    shard = InputShard(str(tmp_path / "in" / "part-00000.parquet"), len(rows), 0, 0)
    store.set_inputs("train", [shard.signature()])
    names = [f"t{i}" for i in range(teachers)]
    dense = {}
    for name in names:
        store.set_teacher(name, name, {})
        logits = torch.randn(sum(n - 1 for n in lengths), VOCAB)
        dense[name] = logits
        data, entry = encode_token_shard(np.arange(len(rows)), np.array(lengths) - 1, *topk_targets(logits, k))
        os.makedirs(tmp_path / "store" / "train" / name, exist_ok=True)
        (tmp_path / "store" / "train" / name / "part-00000.parquet").write_bytes(data)
        store.commit("train", name, 0, {**entry, "num_classes": VOCAB, "dtype": "float16"})
    return cfg, store, names, rows, dense


def test_batches_pick_each_target_token_with_its_teachers_targets(tmp_path):
    lengths = [5, 3, 4]
    cfg, store, names, rows, dense = synthetic_store(tmp_path, lengths)
    batches = list(iter_batches(cfg, store, "train", names, [(0, 0, 3)], 2, None))
    assert [len(b.tokens) for b in batches] == [2, 1]
    offsets = np.concatenate([[0], np.cumsum(np.array(lengths) - 1)])
    seen = 0
    for b, first_row in zip(batches, (0, 2)):
        width = b.tokens.shape[1]
        for n, pos in enumerate(b.positions.tolist()):
            r, j = first_row + pos // width, pos % width
            assert b.labels[n].item() == rows[r][j + 1]                       # position j predicts token j + 1
            for k, name in enumerate(names):
                expected = torch.log_softmax(dense[name][offsets[r] + j], -1).topk(4).values
                assert torch.allclose(b.logp[n, k].float(), expected, atol=2e-3)
            seen += 1
    assert seen == sum(n - 1 for n in lengths)                               # every target once, nothing else


def test_a_batch_across_two_shards_keeps_positions_right():
    tokens = np.array([[1, 2, 3, 0], [4, 5, 6, 7]])
    lengths, mask = np.array([3, 4]), np.array([[0, 1, 1, 0], [0, 1, 1, 1]], bool)
    a = make_batch(np.array([0]), tokens, lengths, mask, [])
    b = make_batch(np.array([1]), tokens, lengths, mask, [])
    from ensemblekd.token_pipeline import _join

    joined = _join([(np.array([0]), (tokens, lengths, mask, [])), (np.array([1]), (tokens, lengths, mask, []))])
    assert joined.tokens.shape == (2, 4)
    flat = joined.tokens.reshape(-1)
    assert flat[joined.positions + 1].tolist() == joined.labels.tolist() == [*a.labels.tolist(), *b.labels.tolist()]


# -- every strategy and rule on a token batch ------------------------------------------------
class _Engine(torch.nn.Module):
    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.model = tiny_gpt2(VOCAB, n_layer=1, n_embd=16, n_head=2)

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("strategy, weighting", [*(("parallel", w) for w in WEIGHTINGS), ("sequential", "uniform"),
                                                 ("assistant", "entropy")])
def test_every_strategy_gives_a_finite_loss_and_gradients_on_tokens(tmp_path, strategy, weighting):
    cfg, store, names, _, _ = synthetic_store(tmp_path, [6, 4, 5], teachers=2)
    dc = cfg.distill.model_copy(update={"strategy": strategy, "weighting": weighting,
                                        "weights": {"t0": 1.0, "t1": 3.0} if weighting == "static" else None})
    extra = {"assistant_names": ["t1"]} if strategy == "assistant" else {}
    strat = build_strategy(dc, names, {"t0": 0.4, "t1": 0.6}, epochs=2)
    if extra:
        from ensemblekd.weighting import Assistant

        strat = Assistant(names, weighting=weighting, assistant_names=["t1"], ensemble_blend=0.25)
    engine = _Engine()
    batch = next(iter_batches(cfg, store, "train", names, [(0, 0, 3)], 3, None))
    out, weights, n = train_step(engine, batch, strat, cfg, epoch=0)
    out.loss.backward()
    assert n == len(batch.labels) == 12 and torch.isfinite(out.loss)
    assert torch.allclose(weights.sum(-1), torch.ones(n))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in engine.parameters() if p.requires_grad)
    if weighting == "static" and strategy == "parallel":
        assert torch.allclose(weights, torch.tensor([0.25, 0.75]).expand(n, 2))


def test_unlabelled_tokens_do_not_exist_in_a_batch():
    """Every position in a batch has a real next token: IGNORE never reaches the loss."""
    tokens = np.array([[1, 2, 0], [3, 4, 5]])
    b = make_batch(np.array([0, 1]), tokens, np.array([2, 3]), tokens > -1, [])
    assert isinstance(b, TokenBatch) and IGNORE not in b.labels.tolist() and len(b.labels) == 3


# -- the whole pipeline ----------------------------------------------------------------------
@pytest.mark.integration
def test_tiny_lm_run_end_to_end(tmp_path):
    """`ensemblekd run` on configs/tiny_lm.yaml with a smaller corpus: three LM teachers fitted, labelled
    into a top-k store, a student distilled by 2 DeepSpeed workers, evaluated and logged."""
    data = tmp_path / "data"
    prepare_markov(str(data), vocab_size=512, seq_len=32, train=256, val=64, test=64, shard_rows=64)
    overrides = {"data.train": str(data / "train"), "data.val": str(data / "val"), "data.test": str(data / "test"),
                 "data.prepare": None, "trainer.epochs": 2, "store.uri": str(tmp_path / "store"),
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
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{tracking.STUDENT_MODEL}")
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
    from ensemblekd.label import label
    from ensemblekd.lm import vocab_hash

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    _save_hf_teacher(tmp_path / "a", vocab, 1)
    _save_hf_teacher(tmp_path / "b", vocab, 2)
    _save_hf_teacher(tmp_path / "c", {**vocab, "w7": VOCAB, "[UNK]": 7}, 1)  # another tokenizer: ids moved
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        write_token_split(str(tmp_path / "data" / split), [rng.integers(0, VOCAB, 12) for _ in range(6)], shard_rows=3)

    def config(teachers: list[str], tokenizer: str):
        raw = yaml.safe_load((ROOT / "configs" / "tiny_lm.yaml").read_text())
        raw["data"].update({s: str(tmp_path / "data" / s) for s in ("train", "val", "test")})
        raw["data"].update(prepare=None, vocab_size=VOCAB, tokenizer=tokenizer)
        raw["teachers"] = [{"name": n, "pretrained": str(tmp_path / n), "batch_size": 4} for n in teachers]
        raw["store"]["uri"] = str(tmp_path / f"store-{''.join(teachers)}")
        raw["ray"] = {"num_cpus": 2}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_config(path)

    cfg = config(["a", "b"], "teachers")
    result = label(cfg, progress=False)
    assert result["shards"] == 2 * 6
    store = Store.open(cfg.store.uri)
    assert store.m["vocab_hash"] == vocab_hash(str(tmp_path / "a")) != vocab_hash(VOCAB)
    assert store.m["teachers"]["a"]["spec"] == {"pretrained": str(tmp_path / "a")}
    with pytest.raises(UserError, match="the teachers' tokenizers differ"):
        label(config(["a", "c"], "teachers"), progress=False)
    with pytest.raises(UserError, match="is not data.tokenizer's"):
        label(config(["c"], str(tmp_path / "a")), progress=False)
    assert not (tmp_path / "store-ac" / "manifest.json").exists()
