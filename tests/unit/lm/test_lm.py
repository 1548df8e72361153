"""ensemblekd.lm: the causal-LM builders, loading, vocabulary hashes, fitting on the synthetic
language (ensemblekd.data.builtin; its own tests are in tests/unit/data/test_builtin.py); and
tools/bench_lm_store.py --quick running end to end."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from ensemblekd import lm
from ensemblekd.data.builtin import markov_corpus
from ensemblekd.errors import UserError

V = 512


@pytest.mark.parametrize("build", [lambda: lm.tiny_gpt2(V, n_layer=1, n_embd=32),
                                   lambda: lm.tiny_llama(V, num_hidden_layers=1, hidden_size=32)])
def test_builders_give_logits_and_round_trip_their_state(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randint(0, V, (3, 7))
    with torch.no_grad():
        logits = model(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (3, 7, V)
        torch.manual_seed(1)
        fresh = build().eval()
        assert not torch.allclose(fresh(x), logits)
        fresh.load_state_dict(model.state_dict())  # strict: same keys in a fresh build
        assert torch.equal(fresh(x), logits)
        masked = model(x, attention_mask=torch.ones_like(x))
    assert torch.allclose(masked, logits, atol=1e-5)


def test_logits_of_accepts_tensors_and_model_outputs():
    t = torch.zeros(2, 3, 4)
    assert lm.logits_of(t) is t
    hf = lm.tiny_gpt2(V, n_layer=1, n_embd=32).lm
    out = hf(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert lm.logits_of(out).shape == (1, 4, V)
    with pytest.raises(TypeError):
        lm.logits_of((t,))


def test_from_pretrained_loads_a_saved_model(tmp_path):
    torch.manual_seed(0)
    model = lm.tiny_gpt2(V, n_layer=1, n_embd=32).eval()
    model.lm.save_pretrained(tmp_path / "m")
    loaded = lm.from_pretrained(str(tmp_path / "m"))
    assert isinstance(loaded, lm.CausalLM)
    x = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    with pytest.raises(UserError, match="is not a directory"):
        lm.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        lm.from_pretrained(str(tmp_path / "empty"))
    model.lm.config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(UserError, match="cannot load a causal LM"):
        lm.from_pretrained(str(tmp_path / "config_only"))


def _save_tokenizer(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_vocab_hash_is_stable_and_tells_vocabularies_apart(tmp_path):
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}
    _save_tokenizer(tmp_path / "a", vocab)
    _save_tokenizer(tmp_path / "b", {**{k: v for k, v in vocab.items() if k != "sat"}, "mat": 3})
    h = lm.vocab_hash(str(tmp_path / "a"))
    assert h == lm.vocab_hash(tmp_path / "a") == lm.vocab_hash(vocab) == lm.vocab_hash(dict(reversed(vocab.items())))
    assert len(h) == 16
    assert lm.vocab_hash(str(tmp_path / "b")) != h
    assert lm.vocab_hash({**vocab, "sat": 4}) != h                  # same tokens, another id
    assert lm.vocab_hash(V) == lm.vocab_hash(V) != lm.vocab_hash(V + 1)
    with pytest.raises(UserError, match="does not exist"):
        lm.vocab_hash(str(tmp_path / "missing"))


@pytest.fixture
def one_thread():
    """Tiny models step faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_fitted_tiny_lm_is_peaked_like_a_real_one(one_thread):
    """A few seconds of fit_lm: most of the mass in the top 32 of 512 on held-out text (untrained: ~1/16)."""
    torch.manual_seed(0)
    train = markov_corpus(V, 512, 32, seed=0, sample_seed=1)
    held_out = markov_corpus(V, 64, 32, seed=0, sample_seed=2)
    model = lm.tiny_gpt2(V, n_layer=1, n_embd=64)

    def top32_mass():
        p = torch.from_numpy(lm.predict_lm(model, held_out)).softmax(-1)
        assert p.shape == (64, 32, V)
        return float(p.topk(32, -1).values.sum(-1).mean())

    before = top32_mass()
    lm.fit_lm(model, train, epochs=8, lr=1e-2, batch_size=8, seed=0)
    after = top32_mass()
    assert before < 0.2
    assert after >= 0.93, after  # about 0.96 measured


def test_bench_lm_store_quick(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_lm_store.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "lm_store.json").read_text())
    table = (out / "lm_store.md").read_text()
    assert "| V | teacher | k |" in table and "192 B/token" in table
    rows = result["rows"]
    assert {(r["vocab_size"], r["k"]) for r in rows} == {(v, k) for v in (512, 32768, 131072) for k in (8, 32, 128)}
    assert len({r["teacher"] for r in rows if r["vocab_size"] == 512}) == 3
    for r in rows:
        assert r["round_trip"], r
        assert 0 < r["bytes_per_token"] < r["full_f16_bytes_per_token"]
        assert 0 <= r["mass_mean"] <= 1 + 1e-6 and r["kl_mean"] >= -1e-3
        assert (r["target"] is None) == (r["met"] is None) == (r["k"] != 32)
    for key in ("cpu", "cores", "date", "python", "torch", "transformers", "pyarrow"):
        assert str(result["machine"][key]) in table, key
    assert result["settings"]["quick"] and result["throughput"] is None
