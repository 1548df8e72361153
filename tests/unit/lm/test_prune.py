"""ensemblekd.prune on tiny Llama and BERT configs built in code: the blocks and channels it keeps,
the shapes it writes, and that a model with nothing removed is the teacher to the last bit."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, \
    LlamaForCausalLM

from ensemblekd import prune
from ensemblekd.errors import UserError
from ensemblekd.lm import CausalLM
from ensemblekd.models import count_parameters


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return CausalLM(LlamaForCausalLM(config)).eval()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                        num_attention_heads=4, num_labels=3, max_position_embeddings=32)
    return BertForSequenceClassification(config).eval()


def tokens(n=4, length=12, seed=0):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        out = model(x) if isinstance(model, CausalLM) else model(input_ids=x).logits
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_nothing_removed_is_the_teacher_bit_for_bit(which, request):
    teacher = request.getfixturevalue(which)
    scores = prune.measure(teacher, [tokens(), tokens(seed=1)])
    kept = prune.plan(teacher, scores, None, widths={w: None for w in prune.WIDTHS})
    assert kept.layers == [0, 1, 2, 3] and kept.widths == {}
    student = prune.prune(teacher, scores, kept)
    x = tokens(seed=2)
    assert torch.equal(logits(student, x), logits(teacher, x))


def test_block_influence_is_one_minus_the_cosine_of_a_blocks_input_and_output(llama):
    x = tokens()
    scores = prune.measure(llama, [x])
    with torch.no_grad():
        states = llama.lm(input_ids=x, output_hidden_states=True).hidden_states
    # hidden_states[i] enters block i; the last entry is after the final norm, so block 3's output is not in it
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)
        assert scores.influence[i] == pytest.approx(float((1 - cos).mean()), rel=1e-6)
    assert scores.tokens == x.numel() and len(scores.mlp) == 4 and scores.mlp[0].shape == (48,)
    assert scores.heads[0].shape == (4,) and scores.hidden.shape == (32,)


def test_a_count_keeps_the_most_influential_blocks_in_order_and_spaced_keeps_every_other(llama):
    scores = prune.measure(llama, [tokens()])
    scores.influence = [0.9, 0.1, 0.5, 0.3]
    assert prune.plan(llama, scores, 2).layers == [0, 2]
    assert prune.plan(llama, scores, 0.75).layers == [0, 2, 3]
    assert prune.plan(llama, scores, 2, how="spaced").layers == [0, 2]
    assert prune.plan(llama, scores, [3, 1]).layers == [1, 3]


def test_depth_pruning_copies_the_kept_blocks(llama):
    scores = prune.measure(llama, [tokens()])
    student = prune.prune(llama, scores, prune.Plan([1, 3]))
    assert student.config.num_hidden_layers == 2
    src, dst = llama.lm.state_dict(), student.state_dict()
    for new, old in ((0, 1), (1, 3)):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(dst[f"model.layers.{new}.{name}"], src[f"model.layers.{old}.{name}"])
    assert torch.equal(dst["lm_head.weight"], src["lm_head.weight"])
    assert logits(student, tokens()).shape == (4, 12, 64)


def test_width_pruning_keeps_the_most_active_channels_and_heads_per_key_value_group(llama):
    scores = prune.measure(llama, [tokens()])
    scores.mlp = [torch.arange(48.0).flip(0) for _ in range(4)]           # channel 0 the most active
    scores.heads = [torch.tensor([1.0, 5.0, 4.0, 2.0]) for _ in range(4)]  # groups (0, 1) and (2, 3)
    scores.hidden = torch.arange(32.0)                                     # channel 31 the most active
    kept = prune.plan(llama, scores, 3, widths={"intermediate_size": 0.5, "num_attention_heads": 2, "hidden_size": 24})
    assert kept.widths == {"intermediate_size": 24, "num_attention_heads": 2, "hidden_size": 24}
    student = prune.prune(llama, scores, kept)
    c = student.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.hidden_size,
            c.head_dim) == (3, 24, 2, 2, 24, 8)
    src, dst = llama.lm.state_dict(), student.state_dict()
    old = kept.layers[0]
    hidden = torch.arange(8, 32)
    heads = torch.cat([torch.arange(8, 16), torch.arange(16, 24)])        # head 1 of group 0, head 2 of group 1
    q = src[f"model.layers.{old}.self_attn.q_proj.weight"][heads][:, hidden]
    assert torch.equal(dst["model.layers.0.self_attn.q_proj.weight"], q)
    assert torch.equal(dst["model.layers.0.self_attn.o_proj.weight"],
                       src[f"model.layers.{old}.self_attn.o_proj.weight"][hidden][:, heads])
    assert torch.equal(dst["model.layers.0.mlp.up_proj.weight"],
                       src[f"model.layers.{old}.mlp.up_proj.weight"][:24][:, hidden])
    assert torch.equal(dst["model.embed_tokens.weight"], src["model.embed_tokens.weight"][:, hidden])
    assert logits(student, tokens()).shape == (4, 12, 64)
    assert count_parameters(student) < count_parameters(llama)


def test_a_pruned_model_saves_and_loads_as_an_ordinary_model_of_its_family(llama, tmp_path):
    scores = prune.measure(llama, [tokens()])
    student = prune.prune(llama, scores, prune.plan(llama, scores, 2, widths={"intermediate_size": 16}))
    student.save_pretrained(tmp_path)
    loaded = prune.pruned_student(str(tmp_path))
    x = tokens(seed=3)
    assert torch.equal(logits(loaded, x), logits(student, x))


def test_bert_drops_blocks_and_mlp_channels_and_refuses_what_its_config_cannot_say(bert):
    scores = prune.measure(bert, [tokens()])
    kept = prune.plan(bert, scores, 2, how="spaced", widths={"intermediate_size": 24})
    assert kept.layers == [0, 2]
    student = prune.prune(bert, scores, kept)
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (2, 24)
    keep = torch.sort(torch.argsort(-scores.mlp[2], stable=True)[:24]).values
    assert torch.equal(student.state_dict()["bert.encoder.layer.1.intermediate.dense.weight"],
                       bert.state_dict()["bert.encoder.layer.2.intermediate.dense.weight"][keep])
    assert torch.equal(student.state_dict()["classifier.weight"], bert.state_dict()["classifier.weight"])
    assert logits(student, tokens()).shape == (4, 3)
    for width in ("num_attention_heads", "hidden_size"):
        with pytest.raises(UserError, match=f"student.init.{width}: a bert model keeps its {width}"):
            prune.plan(bert, scores, None, widths={width: 0.5})


def test_what_cannot_be_pruned_is_refused_in_one_line(llama):
    scores = prune.measure(llama, [tokens()])
    with pytest.raises(UserError, match="3 query heads do not split over the 2 key/value heads"):
        prune.plan(llama, scores, None, widths={"num_attention_heads": 3})
    with pytest.raises(UserError, match="keep between 1 and 4, not 5"):
        prune.plan(llama, scores, 5)
    with pytest.raises(UserError, match="distinct block indices"):
        prune.plan(llama, scores, [0, 0])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(UserError, match="cannot prune a gpt2 model; ensemblekd prunes llama, bert"):
        prune.measure(CausalLM(gpt2), [tokens()])
    with pytest.raises(UserError, match="not a Hugging Face transformer"):
        prune.measure(torch.nn.Linear(3, 3), [torch.zeros(1, 3)])
