"""task: token without Ray, DeepSpeed or MLflow — config checks, token data, batches aligned with
the store, and every strategy's step on a token batch. (The whole pipeline on the tiny LM config is
in tests/integration/test_token_pipeline.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, tiny_lm_config

import ensemblekd as ekd
from ensemblekd.config import AssistantConfig
from ensemblekd.data.builtin import write_token_split
from ensemblekd.data.inputs import InputShard, read_token_shard
from ensemblekd.errors import UserError
from ensemblekd.lm import tiny_gpt2
from ensemblekd.losses import IGNORE
from ensemblekd.mixing import WEIGHTINGS, Assistant, build_strategy, rule_maker
from ensemblekd.store import Store
from ensemblekd.tasks import get_task
from ensemblekd.tasks.token import TokenBatch, encode, make_batch
from ensemblekd.tasks.token.batches import join_batches
from ensemblekd.topk import topk_targets

VOCAB = 64
TOKEN = get_task("token")


# -- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"data.vocab_size": None}, "data.vocab_size: task token needs"),
    ({"distill.mix_space": "logit"}, "use mix_space: prob"),
    ({"task": "classification"}, "'markov' is a data set for task token"),
    ({"teachers.0.pretrained": "some/dir"}, "needs either model"),
    ({"data.tokenizer": "gpt2_4l"}, "data.tokenizer: teacher 'gpt2_4l' has no tokenizer of its own"),
])
def test_token_config_mistakes_are_one_line(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        ekd.load_config(tiny_lm_config(tmp_path, **change), check=False)


def test_the_tiny_lm_config_validates():
    cfg = ekd.load_config(REPO / "configs" / "tiny_lm.yaml", check=False)
    assert cfg.task == "token" and cfg.data.vocab_size == 512 and cfg.store.top_k == 32


# -- data ------------------------------------------------------------------------------------
def test_token_shards_pad_right_and_mask_the_first_token_and_padding(tmp_path):
    write_token_split(str(tmp_path / "s"), [np.array([5, 6, 7, 8]), np.array([9, 10])])
    cfg = ekd.load_config(tiny_lm_config(tmp_path), check=False)
    shard = InputShard(str(tmp_path / "s" / "part-00000.parquet"), 2, 0, 0)
    ids, tokens, lengths, mask = read_token_shard(shard, cfg.data)
    assert ids.tolist() == [0, 1] and lengths.tolist() == [4, 2]
    assert tokens.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert mask.tolist() == [[False, True, True, True], [False, True, False, False]]


def test_a_given_loss_mask_is_honoured_and_bad_ids_are_refused(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": [0], "tokens": [[1, 2, 3, 4]], "loss_mask": [[True, True, False, True]]}), path)
    cfg = ekd.load_config(tiny_lm_config(tmp_path), check=False)
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
    cfg = ekd.load_config(tiny_lm_config(tmp_path, **{"data.vocab_size": VOCAB, "store.top_k": k}), check=False)
    store = Store.open(str(tmp_path / "store"), create=True)
    shard = InputShard(str(tmp_path / "in" / "part-00000.parquet"), len(rows), 0, 0)
    store.set_inputs("train", [shard.signature()])
    names = [f"t{i}" for i in range(teachers)]
    dense = {}
    for name in names:
        store.set_teacher(name, name, {})
        logits = torch.randn(sum(n - 1 for n in lengths), VOCAB)
        dense[name] = logits
        data, entry = encode(np.arange(len(rows)), np.array(lengths) - 1, *topk_targets(logits, k))
        os.makedirs(tmp_path / "store" / "train" / name, exist_ok=True)
        (tmp_path / "store" / "train" / name / "part-00000.parquet").write_bytes(data)
        store.commit("train", name, 0, {**entry, "num_classes": VOCAB, "dtype": "float16"})
    return cfg, store, names, rows, dense


def test_a_store_labelled_under_one_codec_refuses_the_other(tmp_path):
    from ensemblekd.tasks.token import vocabulary

    cfg, store, _, _, _ = synthetic_store(tmp_path, [5, 3], teachers=1)
    store.set_task("token", vocabulary(cfg))
    store.save()
    ranked = ekd.load_config(tiny_lm_config(tmp_path, **{"data.vocab_size": VOCAB, "store.top_k": 4,
                                                         "store.codec": "ranked"}), check=False)
    reopened = Store.open(store.uri)
    with pytest.raises(UserError, match="labelled with codec float16, the config gives ranked"):
        reopened.set_task("token", vocabulary(ranked))
    with pytest.raises(UserError, match="labelled with codec float16, the config gives ranked"):
        reopened.check_task("token", vocabulary(ranked))
    reopened.manifest.pop("codec")                          # a store from before store.codec existed
    reopened.save()
    old = Store.open(store.uri)                             # holds float16, the one codec there was then
    old.check_task("token", vocabulary(cfg), TOKEN.implicit_store_info)
    with pytest.raises(UserError, match="labelled with codec float16, the config gives ranked"):
        old.check_task("token", vocabulary(ranked), TOKEN.implicit_store_info)


def test_batches_pick_each_target_token_with_its_teachers_targets(tmp_path):
    lengths = [5, 3, 4]
    cfg, store, names, rows, dense = synthetic_store(tmp_path, lengths)
    batches = list(TOKEN.batches(cfg, store, "train", names, [(0, 0, 3)], 2, None))
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

    joined = join_batches([(np.array([0]), (tokens, lengths, mask, [])), (np.array([1]), (tokens, lengths, mask, []))])
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
                                        **({"weights": {"t0": 1.0, "t1": 3.0}} if weighting == "static" else {})})
    strat = build_strategy(dc, names, {"t0": 0.4, "t1": 0.6}, epochs=2)
    if strategy == "assistant":
        level = AssistantConfig(name="t1", model="ensemblekd.lm:tiny_gpt2")
        strat = Assistant(names, rule_maker(weighting), assistants=[level], ensemble_blend=0.25)
    engine = _Engine()
    batch = next(TOKEN.batches(cfg, store, "train", names, [(0, 0, 3)], 3, None))
    out, weights, n = TOKEN.train_step(engine, batch, strat, cfg, epoch=0)
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


# -- label -----------------------------------------------------------------------------------
class _OneOddLogit(torch.nn.Module):
    """Logits of a fixed ramp, except id 3 at the batch's row 1, position 2, which gets `value`."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.arange(VOCAB, dtype=torch.float32).expand(*x.shape, VOCAB).clone() / VOCAB
        if len(z) > 1:
            z[1, 2, 3] = self.value
        return z


@pytest.mark.parametrize("value, refused", [(float("nan"), True), (float("inf"), True), (float("-inf"), False)])
def test_label_refuses_nan_and_inf_logits_but_takes_minus_inf_as_zero(tmp_path, value, refused):
    cfg = ekd.load_config(tiny_lm_config(tmp_path, **{"data.vocab_size": VOCAB, "store.top_k": VOCAB}), check=False)
    teacher = cfg.teachers[0].model_copy(update={"batch_size": 2})
    lengths = np.array([6, 5, 4])
    tokens = np.zeros((3, 6), np.int32)
    inputs = (np.arange(3), tokens, lengths, None)
    if refused:
        with pytest.raises(UserError, match=rf"teacher '{teacher.name}' produced NaN/Inf logits on train shard 0"):
            TOKEN.label_shard(_OneOddLogit(value), inputs, cfg, teacher, "cpu", "train shard 0")
        return
    data, entry = TOKEN.label_shard(_OneOddLogit(value), inputs, cfg, teacher, "cpu", "train shard 0")
    from ensemblekd.store import unpack
    from ensemblekd.tasks.token import decode

    got = decode(unpack(data))
    assert entry["tokens"] == 5 + 4 + 3 and got.lengths.tolist() == [5, 4, 3]
    odd = 5 + 2                                   # row 1's third position in the flattened shard
    probs = np.exp(got.logp.astype(np.float64))
    assert probs[odd][got.idx[odd] == 3] == 0 and np.isclose(probs[odd].sum(), 1, atol=1e-2)
    assert np.isclose(probs[0].sum(), 1, atol=1e-2) and (got.idx[0, 0] == VOCAB - 1)


# -- a teacher with a tokenizer of its own ---------------------------------------------------------
def test_a_teacher_with_its_own_tokenizer_reads_each_rows_text(tmp_path):
    """It stores its targets over its own vocabulary at its own positions, with its tokens and their
    byte ends in the row's text (docs/cross-tokenizer.md); a split without text is one line."""
    from tiny_tokenizers import TEXTS, byte_level_tokenizer, fast_tokenizer, metaspace_tokenizer, tiny_llama_dir

    from ensemblekd.crosstok import byte_ends
    from ensemblekd.data.inputs import input_shards
    from ensemblekd.data.text import write_text_split
    from ensemblekd.lm import logits_of
    from ensemblekd.store import unpack
    from ensemblekd.tasks.token import decode
    from ensemblekd.teachers import kind_of

    shared, own = fast_tokenizer(byte_level_tokenizer()), fast_tokenizer(metaspace_tokenizer())
    shared.save_pretrained(tmp_path / "shared")
    write_text_split(str(tmp_path / "in"), TEXTS, np.arange(len(TEXTS)), shared, 16, 0, {})
    teacher = {"name": "own", "pretrained": str(tiny_llama_dir(tmp_path / "teacher", own)), "batch_size": 2}
    cfg = ekd.load_config(tiny_lm_config(tmp_path, **{"data.vocab_size": len(shared), "store.top_k": 8, "teachers": [teacher],
                                                      "data.tokenizer": str(tmp_path / "shared")}), check=False)
    t = cfg.teachers[0]
    model = kind_of(t).load(cfg, t)
    inputs = TOKEN.read_inputs(cfg, input_shards(str(tmp_path / "in"))[0].signature())
    data, entry = TOKEN.label_shard(model, inputs, cfg, t, "cpu", "train shard 0")
    got = decode(unpack(data))
    texts = inputs[3]
    assert "".join(texts).startswith(TEXTS[0][:10]) and len(texts) == len(inputs[0])
    enc = own(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert got.own_tokens.tolist() == sum(enc["input_ids"], [])
    assert got.byte_ends.tolist() == np.concatenate([byte_ends(x, o) for x, o in zip(texts, enc["offset_mapping"])]).tolist()
    assert got.lengths.tolist() == [len(ids) - 1 for ids in enc["input_ids"]] != (inputs[2] - 1).tolist()
    assert entry["own_vocab_size"] == len(own) != entry["num_classes"] == len(shared)
    row = torch.tensor([enc["input_ids"][0]])
    ref = topk_targets(logits_of(model(row))[0, :-1], 8, following=row[0, 1:])
    n = got.lengths[0]
    assert np.array_equal(got.idx[:n], ref[1]) and np.allclose(got.logp[:n], ref[0]) and np.allclose(got.next[:n], ref[3])
    with pytest.raises(UserError, match=r"^teacher 'own': its tokenizer is not data.tokenizer.*write the splits from text"):
        TOKEN.label_shard(model, (*inputs[:3], None), cfg, t, "cpu", "train shard 0")


def _two_tokenizer_store(tmp_path, split: str = "train"):
    """A text split in a byte-level BPE (the student's), labelled by a tiny Llama that reads those
    ids ('same') and by one with a "▁" BPE of its own ('own')."""
    from tiny_tokenizers import TEXTS, byte_level_tokenizer, fast_tokenizer, metaspace_tokenizer, tiny_llama_dir

    from ensemblekd.data.inputs import input_shards
    from ensemblekd.data.text import write_text_split
    from ensemblekd.teachers import kind_of

    shared, own = fast_tokenizer(byte_level_tokenizer()), fast_tokenizer(metaspace_tokenizer())
    shared.save_pretrained(tmp_path / "shared")
    write_text_split(str(tmp_path / "in"), TEXTS * 2, np.arange(2 * len(TEXTS)), shared, 24, 0, {})
    teachers = [{"name": "same", "pretrained": str(tiny_llama_dir(tmp_path / "same", shared, seed=1)), "batch_size": 4},
                {"name": "own", "pretrained": str(tiny_llama_dir(tmp_path / "own", own)), "batch_size": 4}]
    cfg = ekd.load_config(tiny_lm_config(tmp_path, **{"data.vocab_size": len(shared), "store.top_k": 8, "teachers": teachers,
                                                      "data.tokenizer": str(tmp_path / "shared")}), check=False)
    store = Store.open(str(tmp_path / "store"), create=True)
    shard = input_shards(str(tmp_path / "in"))[0]
    store.set_inputs(split, [shard.signature()])
    inputs = TOKEN.read_inputs(cfg, shard.signature())
    for t in cfg.teachers:
        store.set_teacher(t.name, t.name, {})
        data, entry = TOKEN.label_shard(kind_of(t).load(cfg, t), inputs, cfg, t, "cpu", f"{split} shard 0")
        os.makedirs(tmp_path / "store" / split / t.name, exist_ok=True)
        (tmp_path / "store" / split / t.name / "part-00000.parquet").write_bytes(data)
        store.commit(split, t.name, 0, entry)
    TOKEN.keep_in_store(cfg, store)
    return cfg, store, inputs, own


def test_a_teacher_with_its_own_tokenizer_meets_the_student_where_both_read_the_same_bytes(tmp_path):
    from ensemblekd.data.inputs import read_row_text

    cfg, store, inputs, own = _two_tokenizer_store(tmp_path)
    mapping = store.arrays("own", "vocab_map")["map"]
    assert len(mapping) == len(own) and (mapping >= 0).mean() > 0.3
    ids, tokens, lengths, texts = inputs
    rows = len(ids)
    batch = next(TOKEN.batches(cfg, store, "train", ["same", "own"], [(0, 0, rows)], rows, None))
    assert batch.present[:, 0].all() and 0 < batch.present[:, 1].float().mean() < 1
    assert batch.maps[0] is None and torch.equal(batch.maps[1], torch.from_numpy(mapping.astype(np.int64)))
    stored = TOKEN.decode(store.read_table("train", "own", 0))
    student_ends = read_row_text(InputShard.of(store.inputs("train")[0]))[1]  # from the whole document's tokens
    width = batch.tokens.shape[1]
    starts = np.concatenate([[0], np.cumsum(stored.lengths + 1)])
    positions = np.concatenate([[0], np.cumsum(stored.lengths)])
    checked = 0
    for n, pos in enumerate(batch.positions.tolist()):  # brute force: the teacher position that read the same bytes
        r, j = pos // width, pos % width
        t_ends = stored.byte_ends[starts[r]:starts[r + 1]]
        s_ends = student_ends[r]
        match = [t for t in range(len(t_ends) - 1) if t_ends[t] == s_ends[j] and (t_ends[t - 1] if t else 0) < t_ends[t]
                 and (s_ends[j - 1] if j else 0) < s_ends[j]]   # no boundary inside a character
        assert bool(batch.present[n, 1]) == bool(match)
        if match:
            flat = positions[r] + match[0]
            assert np.array_equal(batch.logp[n, 1].numpy(), stored.logp[flat])
            assert batch.teacher_labels[n, 1] == stored.own_tokens[starts[r] + match[0] + 1]
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("weighting", ["accuracy", "entropy", "ca_mkd"])
def test_a_step_mixes_teachers_of_two_tokenizers(tmp_path, weighting):
    from ensemblekd.lm import tiny_llama

    cfg, store, inputs, _ = _two_tokenizer_store(tmp_path)
    strat = build_strategy(cfg.distill.model_copy(update={"weighting": weighting}), ["same", "own"],
                           {"same": 0.3, "own": 0.5}, epochs=1)
    engine = _Engine()
    engine.model = tiny_llama(cfg.data.vocab_size, num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                              intermediate_size=32)
    batch = next(TOKEN.batches(cfg, store, "train", ["same", "own"], [(0, 0, len(inputs[0]))], 4, None))
    out, weights, n = TOKEN.train_step(engine, batch, strat, cfg, epoch=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.kd > 0
    assert (weights[~batch.present] == 0).all() and torch.allclose(weights.sum(-1), torch.ones(n))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in engine.parameters() if p.requires_grad)


def test_uld_weight_scales_the_uld_part_of_the_cross_tokenizer_term(tmp_path):
    """distill.uld_weight is the beta of crosstok.hybrid_loss: the KD term is linear in it."""
    from ensemblekd.lm import tiny_llama

    cfg, store, inputs, _ = _two_tokenizer_store(tmp_path)
    strat = build_strategy(cfg.distill, ["same", "own"], {"same": 0.3, "own": 0.5}, epochs=1)
    engine = _Engine()
    engine.model = tiny_llama(cfg.data.vocab_size, num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                              intermediate_size=32)
    batch = next(TOKEN.batches(cfg, store, "train", ["same", "own"], [(0, 0, len(inputs[0]))], 4, None))
    kd = {w: TOKEN.train_step(engine, batch, strat, cfg.model_copy(update={"distill": cfg.distill.model_copy(
        update={"uld_weight": w})}), epoch=0)[0].kd.item() for w in (0.0, 1.0, 2.0)}
    assert kd[1.0] > kd[0.0] and kd[2.0] - kd[1.0] == pytest.approx(kd[1.0] - kd[0.0], rel=1e-4)


def test_models_of_two_tokenizers_are_compared_in_bits_per_byte(tmp_path):
    """The student's own NLL over the bytes of what it predicts; a teacher with its own tokenizer in
    bits alone and out of the ensemble, which is then the teacher of the student's vocabulary."""
    from ensemblekd.data.inputs import read_row_text
    from ensemblekd.teachers import kind_of

    cfg, store, inputs, _ = _two_tokenizer_store(tmp_path, "test")
    assert TOKEN.ensemble_members(cfg, ["same", "own"]) == ["same"]
    strat = build_strategy(cfg.distill, ["same"], {"same": 0.3}, epochs=1, ensemble=True)
    same = kind_of(cfg.teachers[0]).load(cfg, cfg.teachers[0])
    found, total = TOKEN.quality(cfg, store, ["same", "own"], [], same, strat)  # the student: 'same' itself
    texts = inputs[3]
    assert found["own"]["perplexity"] is None and found["own"]["accuracy"] is None
    stored = TOKEN.decode(store.read_table("test", "own", 0))
    own_bytes = sum(len(t.encode()) for t in texts) - (stored.byte_ends[np.concatenate([[0], np.cumsum(stored.lengths + 1)])[:-1]]).sum()
    assert found["own"]["bits_per_byte"] == pytest.approx(-stored.next.astype(np.float64).sum() / np.log(2) / own_bytes)
    assert found["student"]["bits_per_byte"] == pytest.approx(found["same"]["bits_per_byte"], rel=2e-3)
    assert found["ensemble"]["perplexity"] == pytest.approx(found["same"]["perplexity"], rel=1e-3)
    ends = read_row_text(InputShard.of(store.inputs("test")[0]))[1]  # the student predicts all but each row's first token
    target_bytes = sum(len(t.encode()) - int(e[0]) for t, e in zip(texts, ends))
    assert found["student"]["bits_per_byte"] == pytest.approx(found["student"]["nll"] * total / np.log(2) / target_bytes)
    assert found["student"]["bits_per_char"] > found["student"]["bits_per_byte"]  # accents, CJK and emoji: > 1 byte


def test_a_teacher_whose_tokenizer_starts_with_bos_gets_it_before_each_row(tmp_path):
    """Gemma's tokenizer puts <bos> before every text (without it Gemma 3 scores 4x worse): the
    teacher's row starts with it, at byte end 0, so it is never aligned with the student."""
    from tiny_tokenizers import TEXTS, fast_tokenizer, metaspace_tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from ensemblekd.tasks.token.vocabulary import begins_with, own_tokens

    plain = metaspace_tokenizer()
    with_bos = metaspace_tokenizer()
    bos = with_bos.token_to_id("<bos>")
    with_bos.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=with_bos, bos_token="<bos>").save_pretrained(tmp_path / "bos")
    fast_tokenizer(plain).save_pretrained(tmp_path / "plain")
    tokens, lengths, (ids, ends) = own_tokens(str(tmp_path / "bos"), TEXTS[:2], "gemma", "train shard 0")
    _, plain_lengths, (plain_ids, plain_ends) = own_tokens(str(tmp_path / "plain"), TEXTS[:2], "gemma", "train shard 0")
    assert begins_with(fast_tokenizer(plain)) is None and (tokens[:, 0] == bos).all()
    assert (lengths == plain_lengths + 1).all() and len(ids) == len(plain_ids) + 2
    assert ends[0] == 0 and ends[lengths[0]] == 0 and ends[1:lengths[0]].tolist() == plain_ends[:plain_lengths[0]].tolist()


def test_a_student_tokenizer_that_no_teacher_reads_is_refused(tmp_path):
    from tiny_tokenizers import byte_level_tokenizer, fast_tokenizer, metaspace_tokenizer, tiny_llama_dir

    from ensemblekd.tasks.token import vocabulary

    fast_tokenizer(byte_level_tokenizer()).save_pretrained(tmp_path / "shared")
    teacher = {"name": "own", "pretrained": str(tiny_llama_dir(tmp_path / "own", fast_tokenizer(metaspace_tokenizer())))}
    cfg = ekd.load_config(tiny_lm_config(tmp_path, **{"teachers": [teacher], "data.tokenizer": str(tmp_path / "shared")}),
                          check=False)
    with pytest.raises(UserError, match=r"^data.tokenizer: no teacher reads the student's tokenizer .*name one of the"):
        vocabulary(cfg)
    named = ekd.load_config(tiny_lm_config(tmp_path, **{"teachers": [teacher], "data.tokenizer": "own"}), check=False)
    assert "own_tokenizers" not in vocabulary(named)  # the student's tokenizer is the teacher's own
