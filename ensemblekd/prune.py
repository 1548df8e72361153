"""Start a student from a teacher: depth and width pruning of a Hugging Face transformer.

A student learnt from random weights cannot absorb a 135M-parameter teacher from a hundred
thousand tokens; one cut out of the teacher starts where the teacher is (DistilBERT, ShortGPT,
Minitron). One pass over a calibration sample measures, with forward hooks:

- each block's **influence**: 1 − cos(its input, its output), averaged over tokens (ShortGPT's
  block influence). A block that barely turns the residual stream can go; which blocks go matters
  more than how many (on SmolLM2, dropping the 10 of lowest influence gives perplexity 158,
  dropping every other layer 695,695);
- the **importance** of each MLP channel, attention head and hidden channel: the root mean
  square of its activation (Minitron): the MLP's down-projection input, the heads' outputs
  before the output projection, and the normalised residual stream.

`prune` then builds the smaller model from a copy of the teacher's config (a model of the same
family, loadable by from_pretrained) and copies the kept rows and columns of every weight into
it. What each architecture keeps where is one `Family` entry; a model of another family is
refused. Kept indices stay in the teacher's order, so a model with nothing removed is the
teacher, to the last bit.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ensemblekd.errors import UserError

WIDTHS = ("intermediate_size", "num_attention_heads", "hidden_size")


@dataclass(frozen=True)
class Family:
    """Where a transformers architecture keeps what pruning measures and cuts.

    Module paths are relative to the PreTrainedModel; `mlp_in` and `heads_in` relative to a block:
    the modules whose *input* is the MLP's intermediate activation and the heads' concatenated
    outputs. `norms`: modules whose output is the normalised residual stream (hidden importance).
    `axes`: parameter-name patterns (searched in order, first match wins) and, per dimension, which
    width it runs along (None: kept whole). `narrows`: the widths this family can change."""

    blocks: str
    mlp_in: str
    heads_in: str
    norms: tuple[str, ...]
    axes: tuple[tuple[str, tuple[str | None, ...]], ...]
    narrows: tuple[str, ...]
    why_not: str = ""  # why the other widths cannot be narrowed


_LLAMA_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens\.weight$", (None, "hidden_size")),
    (r"self_attn\.q_proj\.weight$", ("num_attention_heads", "hidden_size")),
    (r"self_attn\.q_proj\.bias$", ("num_attention_heads",)),
    (r"self_attn\.[kv]_proj\.weight$", (None, "hidden_size")),
    (r"self_attn\.o_proj\.weight$", ("hidden_size", "num_attention_heads")),
    (r"self_attn\.o_proj\.bias$", ("hidden_size",)),
    (r"mlp\.(gate|up)_proj\.weight$", ("intermediate_size", "hidden_size")),
    (r"mlp\.(gate|up)_proj\.bias$", ("intermediate_size",)),
    (r"mlp\.down_proj\.weight$", ("hidden_size", "intermediate_size")),
    (r"mlp\.down_proj\.bias$", ("hidden_size",)),
    (r"norm\.weight$", ("hidden_size",)),
    (r"lm_head\.weight$", (None, "hidden_size")),
    (r"score\.weight$", (None, "hidden_size")),
)
_BERT_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"intermediate\.dense\.weight$", ("intermediate_size", None)),
    (r"intermediate\.dense\.bias$", ("intermediate_size",)),
    (r"layer\.\d+\.output\.dense\.weight$", (None, "intermediate_size")),
)

FAMILIES: dict[str, Family] = {
    "llama": Family(blocks="layers", mlp_in="mlp.down_proj", heads_in="self_attn.o_proj",
                    norms=("input_layernorm", "post_attention_layernorm"), axes=_LLAMA_AXES, narrows=WIDTHS),
    "bert": Family(blocks="encoder.layer", mlp_in="output.dense", heads_in="attention.output.dense",
                   norms=("output.LayerNorm",), axes=_BERT_AXES, narrows=("intermediate_size",),
                   why_not="its head size is hidden_size / num_attention_heads, so heads and hidden size "
                           "cannot change apart; narrow intermediate_size or drop layers"),
}


def family_of(model: nn.Module, who: str) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"{who}: cannot prune a {model_type or type(model).__name__} model; ensemblekd prunes "
                        f"{', '.join(FAMILIES)} models")
    return FAMILIES[model_type]


def pretrained_of(module: nn.Module, who: str) -> Any:
    """The transformers PreTrainedModel in a module: itself, or one of its children (a CausalLM's
    `lm`, a TextClassifier's `model`)."""
    from transformers import PreTrainedModel

    for m in (module, *module.children()):
        if isinstance(m, PreTrainedModel):
            return m
    raise UserError(f"{who}: the teacher is a {type(module).__name__}, not a Hugging Face transformer; only those "
                    "can start a student")


def _base_of(model: nn.Module) -> nn.Module:
    """The backbone under a head model (LlamaForCausalLM.model, BertForSequenceClassification.bert)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _blocks(model: nn.Module, family: Family) -> Any:
    return _base_of(model).get_submodule(family.blocks)


# -- measuring -----------------------------------------------------------------------------------
@dataclass
class Scores:
    """What one calibration pass measured: per block, its influence, its MLP channels' and its
    heads' importance; and the hidden channels' importance over the whole model."""

    influence: list[float]
    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]
    hidden: torch.Tensor
    tokens: int = 0


class _Meter:
    """Running sums of a pass: 1 − cos per block, squared activations per channel."""

    def __init__(self, n_blocks: int):
        self.turn = torch.zeros(n_blocks, dtype=torch.float64)
        self.count = torch.zeros(n_blocks, dtype=torch.float64)
        self.squares: dict[str, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}

    def add_squares(self, key: str, x: torch.Tensor) -> None:
        s = x.detach().double().pow(2).reshape(-1, x.shape[-1]).sum(0)
        self.squares[key] = self.squares[key] + s if key in self.squares else s

    def add_turn(self, i: int, before: torch.Tensor, after: torch.Tensor) -> None:
        cos = nn.functional.cosine_similarity(before.detach().double(), after.detach().double(), dim=-1)
        self.turn[i] += (1 - cos).sum()
        self.count[i] += cos.numel()


def _hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def measure(module: nn.Module, batches: Iterable[Any], who: str = "student.init",
            progress: Callable[[int], None] | None = None) -> Scores:
    """Run `module` (a teacher as the task calls it) on each calibration batch with hooks on its
    transformer's blocks; `progress` is told after each batch."""
    model = pretrained_of(module, who)
    family = family_of(model, who)
    blocks = _blocks(model, family)
    meter, handles = _Meter(len(blocks)), []

    def block_hooks(i: int, block: nn.Module) -> None:
        def before(_m, args, kwargs):
            meter.inputs[i] = _hidden_states(args, kwargs)

        def after(_m, _args, out):
            meter.add_turn(i, meter.inputs.pop(i), _output(out))

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after))
        for key, name in ((f"mlp{i}", family.mlp_in), (f"heads{i}", family.heads_in)):
            handles.append(block.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, key=key: meter.add_squares(key, args[0])))
        for name in family.norms:
            handles.append(block.get_submodule(name).register_forward_hook(
                lambda _m, _a, out: meter.add_squares("hidden", _output(out))))

    for i, block in enumerate(blocks):
        block_hooks(i, block)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        for n, batch in enumerate(batches, 1):
            module(batch)
            if progress:
                progress(n)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if not meter.count.all():
        raise UserError(f"{who}: the calibration sample reached no block of the teacher; give it more rows")
    heads = model.config.num_attention_heads
    tokens = int(meter.count[0])
    return Scores(influence=(meter.turn / meter.count).tolist(),
                  mlp=[(meter.squares[f"mlp{i}"] / tokens).sqrt().float() for i in range(len(blocks))],
                  heads=[(meter.squares[f"heads{i}"].reshape(heads, -1).sum(1) / tokens).sqrt().float()
                         for i in range(len(blocks))],
                  hidden=(meter.squares["hidden"] / tokens).sqrt().float(), tokens=tokens)


# -- choosing ------------------------------------------------------------------------------------
def count(spec: int | float, total: int, what: str) -> int:
    """A kept count from a count (int) or a share of `total` (a float in (0, 1])."""
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise UserError(f"{what}: a share must lie in (0, 1], not {spec}")
        return max(1, round(spec * total))
    n = int(spec)
    if not 1 <= n <= total:
        raise UserError(f"{what}: keep between 1 and {total}, not {n}")
    return n


def choose_layers(layers: int | float | list[int] | None, influence: list[float], how: str, who: str) -> list[int]:
    """The kept blocks, in order: an explicit list; or a count/share, ranked by influence (`how`
    'influence': the most influential kept) or evenly spaced ('spaced': every other one for half,
    DistilBERT's choice)."""
    total = len(influence)
    if layers is None:
        return list(range(total))
    if isinstance(layers, list):
        bad = [i for i in layers if not 0 <= i < total]
        if bad or len(set(layers)) != len(layers) or not layers:
            raise UserError(f"{who}.layers: {layers} must be distinct block indices in 0..{total - 1}")
        return sorted(layers)
    n = count(layers, total, f"{who}.layers")
    if how == "spaced":
        return [math.floor(i * total / n) for i in range(n)]
    ranked = sorted(range(total), key=lambda i: -influence[i])
    return sorted(ranked[:n])


def _top(score: torch.Tensor, n: int) -> torch.Tensor:
    """The indices of the n largest scores, in ascending index order (ties: the lower index)."""
    order = torch.argsort(-score, stable=True)[:n]
    return torch.sort(order).values


def _head_channels(heads: torch.Tensor, keep: int, kv: int, head_dim: int) -> torch.Tensor:
    """The channels of the kept query heads: the best `keep // kv` of each key/value group, so that
    grouped-query attention stays valid (each group keeps the same number of query heads)."""
    per_group = heads.numel() // kv
    kept = []
    for g in range(kv):
        group = heads[g * per_group:(g + 1) * per_group]
        kept.append(_top(group, keep // kv) + g * per_group)
    idx = torch.cat(kept)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


@dataclass
class Plan:
    """What a pruned model keeps: the teacher's block indices, and per width its new size."""

    layers: list[int]
    widths: dict[str, int] = field(default_factory=dict)


def plan(module: nn.Module, scores: Scores, layers: int | float | list[int] | None = None, how: str = "influence",
         widths: dict[str, int | float | None] | None = None, who: str = "student.init") -> Plan:
    """Check what is asked against the model's family and config, and choose the kept blocks."""
    model = pretrained_of(module, who)
    family, config = family_of(model, who), model.config
    chosen: dict[str, int] = {}
    for key, spec in (widths or {}).items():
        if spec is None:
            continue
        total = int(getattr(config, key))
        n = count(spec, total, f"{who}.{key}")
        if n == total:
            continue
        if key not in family.narrows:
            raise UserError(f"{who}.{key}: a {config.model_type} model keeps its {key}: {family.why_not}")
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if key == "num_attention_heads" and n % kv:
            raise UserError(f"{who}.{key}: {n} query heads do not split over the {kv} key/value heads; keep a "
                            f"multiple of {kv}")
        chosen[key] = n
    return Plan(choose_layers(layers, scores.influence, how, who), chosen)


# -- cutting -------------------------------------------------------------------------------------
def prune(module: nn.Module, scores: Scores, kept: Plan, who: str = "student.init") -> nn.Module:
    """A new model of the teacher's class with `kept`'s blocks and widths, its weights copied from
    the teacher's kept rows and columns (float32, in eval mode)."""
    model = pretrained_of(module, who)
    family, config = family_of(model, who), model.config
    new_config = copy.deepcopy(config)
    new_config.num_hidden_layers = len(kept.layers)
    for key, n in kept.widths.items():
        setattr(new_config, key, n)
    if getattr(config, "head_dim", None):  # the per-head size stays what it was, whatever the heads and hidden size
        new_config.head_dim = config.head_dim
    for attr in ("layer_types",):  # per-layer lists follow the kept layers
        values = getattr(config, attr, None)
        if isinstance(values, list) and len(values) == config.num_hidden_layers:
            setattr(new_config, attr, [values[i] for i in kept.layers])
    new_config.__dict__.pop("quantization_config", None)  # a GGUF teacher is dequantised: float32 weights

    index = _kept_channels(model, scores, kept)
    source = model.state_dict()
    blocks_prefix = _blocks_prefix(model, family)
    with torch.device("meta"):
        shapes = type(model)(new_config).state_dict()
    state = {}
    for name, shape in shapes.items():
        src_name, block = _source_name(name, blocks_prefix, kept.layers)
        if src_name not in source:
            raise UserError(f"{who}: the pruned model has a weight '{name}' the teacher lacks; ensemblekd cannot "
                            f"prune this {config.model_type} model")
        w = source[src_name]
        axes = next((dims for pattern, dims in family.axes if re.search(pattern, name)), ())
        for dim, axis in enumerate(axes):
            if axis in kept.widths:
                w = w.index_select(dim, index[axis][block] if axis != "hidden_size" else index[axis])
        if tuple(w.shape) != tuple(shape.shape):
            raise UserError(f"{who}: cannot cut '{name}' from {tuple(source[src_name].shape)} to {tuple(shape.shape)} "
                            f"in this {config.model_type} model")
        state[name] = w.detach().float().clone()
    new_config.dtype = torch.float32
    pruned = type(model)(new_config)
    pruned.load_state_dict(state, strict=True)
    if getattr(new_config, "tie_word_embeddings", False):
        pruned.tie_weights()
    return pruned.float().eval()


def _blocks_prefix(model: Any, family: Family) -> str:
    """The state-dict prefix of the blocks (e.g. 'model.layers.', 'bert.encoder.layer.')."""
    base = _base_of(model)
    prefix = next(name for name, m in model.named_modules() if m is base)
    return f"{prefix}.{family.blocks}." if prefix else f"{family.blocks}."


def _source_name(name: str, prefix: str, layers: list[int]) -> tuple[str, int | None]:
    """The teacher's name of a pruned model's weight, and its block's index in the pruned model."""
    if not name.startswith(prefix):
        return name, None
    block, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{layers[int(block)]}.{rest}", int(block)


def _kept_channels(model: Any, scores: Scores, kept: Plan) -> dict[str, Any]:
    """For each narrowed width, the kept indices: per pruned block (MLP, heads) or one set (hidden)."""
    config, out = model.config, dict[str, Any]()
    n = kept.widths
    if "intermediate_size" in n:
        out["intermediate_size"] = [_top(scores.mlp[i], n["intermediate_size"]) for i in kept.layers]
    if "num_attention_heads" in n:
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        out["num_attention_heads"] = [_head_channels(scores.heads[i], n["num_attention_heads"], kv, head_dim)
                                      for i in kept.layers]
    if "hidden_size" in n:
        out["hidden_size"] = _top(scores.hidden, n["hidden_size"])
    return out


def pruned_student(path: str, num_classes: int | None = None, max_length: int = 128) -> nn.Module:
    """The student that student.init wrote to `path` (a save_pretrained directory with its
    tokenizer), as its task's stages call it: a causal LM as an lm.CausalLM (token ids in, logits
    out), a sequence classifier as an hf_text.TextClassifier (texts in). num_classes/max_length:
    hf_text.load_classifier's, for a classifier."""
    import json
    import os

    from ensemblekd.hf_text import load_classifier
    from ensemblekd.lm import from_pretrained

    try:
        with open(os.path.join(path, "config.json")) as f:
            architectures = json.load(f).get("architectures") or [""]
    except FileNotFoundError:
        raise UserError(f"student.init: '{path}' holds no pruned model yet; `ensemblekd run` or `distill` writes "
                        "it") from None
    if architectures[0].endswith("ForCausalLM"):
        return from_pretrained(path)
    return load_classifier(path, "student.init", num_classes, max_length)
