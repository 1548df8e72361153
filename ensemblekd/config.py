"""Typed run configuration, checked at load time.

A YAML file (or a mapping) is read, `--set key.path=value` overrides are applied to the raw
mapping, and the result is validated by pydantic models with `extra="forbid"` and cross-field
checks that span sections (teacher names, groups, features, batch split), each error one line
that names the key and the fix. What only an extension point knows (a task's keys, a teacher
kind's fields, the keys a strategy, weighting rule or divergence owns) is checked by that extension when the config is loaded through
`ensemblekd.load_config` (stages.validate), so every mistake is still an error before any work.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ensemblekd.data.builtin import DATASETS
from ensemblekd.errors import UserError
from ensemblekd.io.fs import check_reachable, configure_for, exists, is_remote, resolve_uri
from ensemblekd.losses import DIVERGENCES
from ensemblekd.plugins import format_error, import_callable, is_import_path


def _not_a_bool(value: Any) -> Any:
    """pydantic reads true as 1: a number key given a yes/no is a mistake, not a 1."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_number", "expected a number, not a yes/no value")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
# a module name as model.named_modules() gives it: an nn.Sequential's are numbers, and `feature: 3` means '3'
ModuleName = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Extended(_Section):
    """A section whose extension (a teacher's kind; distill's strategy, weighting rule and
    divergence) owns some of its keys: those pass through here and are validated by the
    extension's Options model when the config is loaded (plugins, stages.validate)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    @property
    def extension_keys(self) -> dict[str, Any]:
        """The keys given beyond the section's own (plugins.own_options picks an extension's)."""
        return dict(self.model_extra or {})


class TextConfig(_Section):
    """A user's own text: Parquet or JSON Lines files (or directories of them) with a text column."""

    train: str
    val: str
    test: str
    column: str = "text"
    id: str | None = Field(default=None, description="integer document id column; default: the row's position")


class DataConfig(_Section):
    train: str = Field(description="Parquet file or directory of shards (any fsspec URI)")
    val: str
    test: str
    features: str = Field(default="x", description="classification: list<float> per row; task token: the "
                          "list<int32> token ids of each sequence")
    text_column: str = Field(default="text", description="task text: the column holding each row's raw text")
    label: str | None = "y"
    id: str = "id"
    loss_mask: str | None = Field(default="loss_mask", description="task token: optional list<bool> per sequence, "
                                  "the tokens trained on (used when the column exists)")
    vocab_size: Int | None = Field(default=None, ge=2, description="task token: the shared vocabulary; teacher "
                                   "logits padded past it are cut to it")
    tokenizer: str | None = Field(default=None, description="task token: the student's tokenizer, which the splits "
                                  "are written with: a local tokenizer directory or .gguf file, a teacher's name (its "
                                  "own), or 'teachers' (the first pretrained teacher's); a teacher with another "
                                  "tokenizer reads the text with its own. Vocabulary hashes are kept in the store")
    prepare: str | None = Field(default=None, description="write this built-in data set to the split paths when "
                                "missing: " + ", ".join(DATASETS))
    text: TextConfig | None = Field(default=None, description="task token: raw text to tokenize into the splits "
                                    "(data.train/val/test), when missing or when the text or tokenizer changed")
    seq_len: Int = Field(default=256, ge=2, description="task token: tokens per sequence when text is tokenized "
                         "(data.text, data.prepare: pydoc); a longer document gives several rows")


class FitConfig(_Section):
    epochs: Int = Field(default=30, ge=1)
    batch_size: Int = Field(default=64, ge=1)
    lr: Float = Field(default=1e-3, gt=0)
    weight_decay: Float = Field(default=0.0, ge=0)
    seed: Int = 0


class LabelActors(_Section):
    """How the label stage runs a model: its actors and their resources (a teacher, or a level of a
    chain of students, which becomes one)."""

    replicas: Int = Field(default=1, ge=1)
    num_cpus: Float = Field(default=0.5, ge=0)
    num_gpus: Float = Field(default=0.0, ge=0)
    resources: dict[str, Float] = Field(default_factory=dict, description="Ray custom resources each of this teacher's "
                                        "actors asks for beside num_cpus/num_gpus: a node tag (`ray start --resources`) "
                                        "puts the teacher on the nodes that have it")
    batch_size: Int = Field(default=1024, ge=1)

    def label_actors(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LabelActors.model_fields}


class TeacherConfig(LabelActors, _Extended):
    """One teacher. `kind` chooses the class that loads, fingerprints and fits it (ensemblekd.teachers);
    which of these keys it needs is that kind's to say, and a key only one kind takes (sklearn's
    `trusted`, gguf's `prepare`) is that kind's own (its Options). `pretrained`, `model` and
    `checkpoint` stay here: the kind is inferred from them when `kind` is not given."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: str | None = Field(default=None, description="torch | huggingface | sklearn; default: huggingface when "
                             "pretrained is set, else torch")
    model: str | None = Field(default=None, description="'module:callable' building the model: a torch.nn.Module "
                              "(kind torch) or a scikit-learn estimator (kind sklearn)")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = Field(default=None, description="kind huggingface: a local Hugging Face model directory "
                                   "(from_pretrained; nothing is downloaded)")
    checkpoint: str | None = Field(default=None, description="the saved model: a state dict (torch) or a skops file "
                                   "(sklearn); where `fit` writes it")
    fit: FitConfig | None = None
    feature: ModuleName | None = Field(default=None, description="store this teacher's features next to its logits (task "
                                "classification): kind torch, the name of the module whose output they are (as in "
                                "model.named_modules()); kind sklearn, 'last_hidden' (an MLP's last hidden layer)")
    group: str | None = Field(default=None, description="label: teachers with the same group share each actor "
                              "(one read of every input shard for all of them); they must share replicas, "
                              "num_cpus, num_gpus and resources. None: CPU teachers alike in resources share "
                              "actors when they fit (stages.placement); a group of one labels alone")


class StoreConfig(_Section):
    uri: str
    dtype: Literal["float16", "float32"] = "float16"
    top_k: Int = Field(default=32, ge=1, description="task token: log-probs kept per token (plus the tail mass); "
                       ">= the vocabulary keeps the full distribution")
    compression_level: Int = Field(default=3, ge=1, le=22, description="task token: zstd level of the token "
                                   "shards; 19 is ~11% smaller and ~30x slower to write")
    codec: Literal["float16", "ranked"] = Field(
        default="float16", description="task token: float16 keeps the top-k log-probs as computed; ranked codes "
        "each log-prob in 1 byte (within 1/32 nat for p > e^-4) and the ids by their frequency in the shard, "
        "~37% fewer bytes at k = 32")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the store's protocol, e.g. {endpoint_url: ...}"
    )
    feature_dim: Int | None = Field(default=None, ge=1, description="teachers' stored features reduced to this many "
                                    "dimensions by a PCA fitted on the train split; None: stored whole")

    @model_validator(mode="after")
    def _options_need_a_protocol(self) -> StoreConfig:
        if self.storage_options and not is_remote(self.uri):
            raise ValueError("store.storage_options: only used with an object-store store.uri (s3://, gs://, ...); "
                             "remove it or give store.uri a protocol")
        return self

    @field_serializer("storage_options")
    def _redacted(self, options: dict[str, Any]) -> dict[str, Any]:
        """Dumps (MLflow params, config.yaml) never carry credentials (key, secret, token, ...)."""
        return _redact(options)


def _redact(options: dict[str, Any]) -> dict[str, Any]:
    secret = ("key", "secret", "token", "password", "credential")
    return {k: _redact(v) if isinstance(v, dict) else "***" if any(w in str(k).lower() for w in secret) else v
            for k, v in options.items()}


Size = Annotated[int | float, BeforeValidator(_not_a_bool)]  # a count (int) or a share of the teacher's (float in (0, 1])
PRUNED_STUDENT = "ensemblekd.prune:pruned_student"      # student.model of a student that student.init starts
PRUNED_LR = 6e-4  # trainer.lr of such a student unless set: a fifth of the default, as the pruning literature advises


class StudentInit(_Section):
    """Start the student from a teacher's weights (ensemblekd.prune): its most influential blocks,
    its most active channels; an ordinary model of the teacher's family, written to `path`."""

    teacher: str = Field(description="the teacher (its name) whose weights start the student: a Llama causal LM "
                         "(GGUF or Hugging Face directory) or a BERT encoder")
    layers: Size | list[Int] | None = Field(default=None, description="blocks kept: a count, a share of the "
                                            "teacher's (0.67), or their indices; None: all")
    choose: Literal["influence", "spaced"] = Field(default="influence", description="which blocks a count keeps: "
                                                   "the highest block influence on the calibration sample, or evenly "
                                                   "spaced ones (every other one for half: DistilBERT)")
    intermediate_size: Size | None = Field(default=None, description="MLP channels kept per block (count or share), "
                                           "the most active on the calibration sample")
    num_attention_heads: Size | None = Field(default=None, description="query heads kept per block (a multiple of "
                                             "the key/value heads)")
    hidden_size: Size | None = Field(default=None, description="residual-stream channels kept (Llama only)")
    calibration: Int = Field(default=32, ge=1, description="rows of the train split the scores are measured on")
    batch_size: Int = Field(default=8, ge=1)
    path: str | None = Field(default=None, description="where the pruned model is written (a Hugging Face "
                             "directory); default trainer.output_dir/student_init")


class StudentConfig(_Section):
    model: str | None = Field(default=None, description="'module:callable' building the student; with init, "
                              f"{PRUNED_STUDENT} (the pruned directory, as its task reads it)")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init: StudentInit | None = None
    feature: ModuleName | None = Field(default=None, description="the module whose output is the student's feature (a name "
                                "from model.named_modules()): what distill.hint_weight and rkd_* compare")


class AssistantConfig(LabelActors):
    """A teacher-assistant level (TAKD): distilled, then labelled into the store like a teacher."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    feature: ModuleName | None = Field(default=None, description="the module whose output is the assistant's feature, when "
                                "the run has feature terms (see student.feature)")


class DistillConfig(_Extended):
    """How the student learns. The keys of the chosen strategy, weighting rule and divergence sit
    here beside these (e.g. `generations` with strategy born_again, `gamma` with weighting
    accuracy): each extension declares and validates its own (its Options model, plugins), so
    this schema lets them through and stages.validate checks them against the chosen extensions."""

    strategy: str = Field(default="parallel", description="parallel | sequential | assistant | born_again, or "
                          "'module:callable'")
    weighting: str = Field(default="uniform", description="uniform | static | accuracy | entropy | ca_mkd, or "
                           "'module:callable'")
    mix_space: Literal["prob", "logit"] = "prob"
    temperature: Float = Field(default=4.0, gt=0)
    alpha: Float = Field(default=0.5, ge=0, le=1)
    loss: str = Field(default="forward_kl", description="the divergence between the teachers' targets and the "
                      "student: " + ", ".join(DIVERGENCES) + ", or 'module:callable' (log_q, log_s) -> D per row")
    uld_weight: Float = Field(default=1.0, ge=0, description="task token, teachers with their own tokenizer: the weight "
                              "of ULD beside the mapped KL in the cross-tokenizer loss (0: mapped KL alone)")
    hint_weight: Float = Field(default=0.0, ge=0, description="FitNets hint: MSE between a learned projection of "
                               "the student's feature and each teacher's stored feature")
    rkd_distance_weight: Float = Field(default=0.0, ge=0, description="RKD distance: the batch's pairwise distances")
    rkd_angle_weight: Float = Field(default=0.0, ge=0, description="RKD angle: the batch's triplet angles")

    @field_validator("loss")
    @classmethod
    def _a_divergence(cls, loss: str) -> str:
        if loss not in DIVERGENCES and not is_import_path(loss):
            raise PydanticCustomError("divergence", "Input should be " + ", ".join(f"'{d}'" for d in DIVERGENCES)
                                      + " or 'module:callable'")
        return loss

    @property
    def feature_terms(self) -> bool:
        """Whether the student learns from the teachers' stored features."""
        return bool(self.hint_weight or self.rkd_distance_weight or self.rkd_angle_weight)


class TrainerConfig(_Section):
    num_workers: Int = Field(default=2, ge=0, description="Ray Train workers; 0: the worker loop runs in the "
                             "driver's own process (no Ray Train, no restarts), as Ray Train's local mode does")
    cpus_per_worker: Float = Field(default=0.5, gt=0)
    use_gpu: bool = False
    epochs: Int = Field(default=20, ge=1)
    batch_size: Int = Field(default=64, ge=1, description="global batch, split across workers")
    lr: Float = Field(default=3e-3, gt=0)
    warmup: Float = Field(default=0.0, ge=0, lt=1, description="the share of the steps over which the learning "
                          "rate rises linearly to lr before its cosine decay (e.g. 0.1 for a transformer student)")
    weight_decay: Float = Field(default=0.0, ge=0)
    zero_stage: Int = Field(default=0, ge=0, le=3)
    seed: Int = 0
    max_failures: Int = Field(default=2, ge=-1, description="worker failures survived by resuming from the "
                              "last epoch's checkpoint (Ray Train FailureConfig); -1: no limit")
    output_dir: str = "runs/ensemblekd"
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="merged over the generated DeepSpeed config"
    )

    @model_validator(mode="after")
    def _in_process_is_not_sharded(self) -> TrainerConfig:
        if self.num_workers == 0 and self.zero_stage == 3:
            # ZeRO-3 patches torch.nn.functional.linear for the life of the process it runs in
            raise ValueError("trainer.zero_stage: 3 shards the student over Ray Train workers; with "
                             "trainer.num_workers 0 (in process) use a stage of 0-2, or workers")
        return self

    @property
    def world_size(self) -> int:
        """The processes that train: num_workers, or the driver alone (num_workers 0)."""
        return max(self.num_workers, 1)


class TrackingConfig(_Section):
    uri: str | None = None
    experiment: str = "ensemblekd"
    run_name: str | None = None
    log_model: bool = Field(default=True, description="log the served student (an MLflow model: what `export` "
                            "registers) in each run/distill run; false for sweeps that only compare metrics")


class RayConfig(_Section):
    address: str | None = Field(default=None, description="None: start local Ray; 'auto': join")
    num_cpus: Int | None = Field(default=None, ge=1, description="CPUs for a local Ray")
    shared_filesystem: bool = Field(default=False, description="on a Ray cluster of several nodes, local paths "
                                    "(data, checkpoints, store.uri, trainer.output_dir) are refused unless this says "
                                    "they are on a filesystem mounted at the same path on every node")


class EvaluateConfig(_Section):
    warmup: Int = Field(default=20, ge=0, description="untimed calls before timing each model (CLI --warmup)")
    repeats: Int = Field(default=200, ge=0, description="timed calls per model and batch size; 0: no latency "
                         "(CLI --repeats)")
    latency_tokens: Int | None = Field(default=None, ge=1, description="task token: sequences cut to this many "
                                       "tokens for timing (a real LM at batch 64 x 256 tokens takes a minute a call)")
    baseline: bool = Field(default=False, description="also train the student on the labels alone (distill.alpha 1, "
                           "same epochs and seed) and report it beside the distilled one")
    prompts: list[str] = Field(default_factory=list, description="task token: greedy continuations of these texts "
                               "by each teacher, the ensemble and the student go into the report")
    max_new_tokens: Int = Field(default=24, ge=1, description="task token: tokens per greedy continuation")


class Config(_Section):
    task: str = Field(default="classification", description="classification | token (causal LMs distilled token by "
                      "token from top-k targets) | text (raw text classified by models that tokenize it themselves)")
    data: DataConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    store: StoreConfig
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [t.name for t in self.teachers]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"teachers: the name '{name}' is used twice; give each teacher a unique name")
        d = self.distill
        featured = [t.name for t in self.teachers if t.feature]
        if self.store.feature_dim and not featured:
            raise ValueError("store.feature_dim: no teacher stores features; give teachers a feature or remove it")
        if d.feature_terms:
            missing = [t.name for t in self.teachers if not t.feature]
            if missing:
                raise ValueError(f"teachers: distill.hint_weight/rkd_* learn from every teacher's features, and "
                                 f"{missing} give none; set their feature (a module name) or set the weights to 0")
            if not self.student.feature:
                raise ValueError("student.feature: distill.hint_weight/rkd_* need the student's feature module; "
                                 "name it (see model.named_modules())")
        self._student_from_init()
        if self.trainer.batch_size % self.trainer.world_size:
            raise ValueError(
                f"trainer.batch_size: {self.trainer.batch_size} does not split evenly over "
                f"{self.trainer.world_size} workers; use a multiple of trainer.num_workers"
            )
        groups: dict[str, TeacherConfig] = {}
        for t in self.teachers:
            first = groups.setdefault(t.group, t) if t.group else t
            placement = lambda x: (x.replicas, x.num_cpus, x.num_gpus, x.resources)  # noqa: E731
            if placement(t) != placement(first):
                raise ValueError(f"teachers: '{t.name}' and '{first.name}' share group '{t.group}' (one actor pool) "
                                 "but not replicas/num_cpus/num_gpus/resources; give them the same values")
        if self.data.prepare and DATASETS.get(self.data.prepare, self.task) != self.task:
            raise ValueError(f"data.prepare: '{self.data.prepare}' is a data set for task {DATASETS[self.data.prepare]}; "
                             f"this config has task {self.task}")
        if self.data.prepare and self.data.prepare not in DATASETS:
            raise ValueError(f"data.prepare: unknown data set '{self.data.prepare}'; choose one of {', '.join(DATASETS)}")
        return self

    def _student_from_init(self) -> None:
        init = self.student.init
        if init is None:
            if self.student.model is None:
                raise ValueError("student.model: give the 'module:callable' that builds the student, or student.init")
            return
        if init.teacher not in [t.name for t in self.teachers]:
            raise ValueError(f"student.init.teacher: no teacher is named '{init.teacher}'; choose one of "
                             f"{', '.join(t.name for t in self.teachers)}")
        init.path = init.path or f"{self.trainer.output_dir.rstrip('/')}/student_init"
        self.student.model = self.student.model or PRUNED_STUDENT
        self.student.kwargs.setdefault("path", init.path)
        if "lr" not in self.trainer.model_fields_set:
            self.trainer.lr = PRUNED_LR

    def node_paths(self) -> dict[str, str]:
        """Every path that Ray actors and workers, on any node, read or write, by config key."""
        paths = {f"data.{split}": getattr(self.data, split) for split in ("train", "val", "test")}
        for i, t in enumerate(self.teachers):
            paths.update({f"teachers.{i}.checkpoint": t.checkpoint, f"teachers.{i}.pretrained": t.pretrained})
        paths.update({"store.uri": self.store.uri, "trainer.output_dir": self.trainer.output_dir})
        return {key: uri for key, uri in paths.items() if uri}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (value parsed as YAML; list items by index)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set '{item}': expected key.path=value, e.g. --set trainer.epochs=3")
        node: Any = raw
        parts = key.split(".")
        part: str | int  # a list's index becomes an int
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: '{where}' is not an index of a list of {len(node)} items")
                part = int(part)
            elif not isinstance(node, dict):
                raise UserError(f"--set {key}: '{'.'.join(parts[:depth])}' is not a section")
            if last:
                node[part] = yaml.safe_load(value)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


# student.kwargs that name local directories (hf_text.classifier, lm.from_pretrained)
STUDENT_PATH_KWARGS = ("tokenizer", "pretrained", "embeddings_from", "path")


def _absolute_paths(cfg: Config) -> None:
    """Local paths become absolute so Ray workers (other cwd) see the same files."""
    for section, key in [("data", "train"), ("data", "val"), ("data", "test"), ("store", "uri"), ("trainer", "output_dir")]:
        obj = getattr(cfg, section)
        setattr(obj, key, resolve_uri(getattr(obj, key)))
    if cfg.data.text:
        for split in ("train", "val", "test"):
            setattr(cfg.data.text, split, resolve_uri(getattr(cfg.data.text, split)))
    for t in cfg.teachers:
        if t.checkpoint:
            t.checkpoint = resolve_uri(t.checkpoint)
        if t.pretrained:
            t.pretrained = resolve_uri(t.pretrained)
    if cfg.student.init and cfg.student.init.path:
        cfg.student.init.path = resolve_uri(cfg.student.init.path)
    for key in STUDENT_PATH_KWARGS:
        value = cfg.student.kwargs.get(key)
        if isinstance(value, str) and value:
            cfg.student.kwargs[key] = resolve_uri(value)
    if cfg.data.tokenizer and cfg.data.tokenizer not in ("teachers", *(t.name for t in cfg.teachers)):
        cfg.data.tokenizer = resolve_uri(cfg.data.tokenizer)


def check_inputs(cfg: Config, check_data: bool = True) -> None:
    """The checks of this schema that touch the outside world: the store's object store (endpoint,
    credentials, bucket), the student's and assistants' import paths, the data files. (The
    teachers' files are their kind's to check: stages.validate.)"""
    check_reachable(cfg.store.uri, "store.uri")
    import_callable(cfg.student.model or "", "student.model")
    if check_data and cfg.data.prepare is None:
        for split in ("train", "val", "test"):
            uri = getattr(cfg.data.text, split) if cfg.data.text else getattr(cfg.data, split)
            if not exists(uri):
                key = "data.text" if cfg.data.text else "data"
                raise UserError(f"{key}.{split}: '{uri}' does not exist; fix the path or set data.prepare")


def parse_config(source: str | os.PathLike | dict[str, Any] | Config, overrides: list[str] | None = None) -> Config:
    """A validated Config from a YAML file, a mapping or a Config, with `key.path=value` overrides;
    local paths made absolute. Touches nothing outside (see check_inputs)."""
    where = "config"
    if isinstance(source, Config):
        raw = source.to_dict()
        raw["store"]["storage_options"] = copy.deepcopy(source.store.storage_options)  # to_dict redacts credentials
    elif isinstance(source, dict):
        raw = yaml.safe_load(yaml.safe_dump(source))  # a deep copy: overrides never change the caller's mapping
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found; pass the path of a YAML file such as configs/digits.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections (data, teachers, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{where}: {format_error(exc)}") from None
    _absolute_paths(cfg)
    configure_for(cfg)
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested config to dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{x.get('name', i)}."))
        else:
            out[key] = v
    return out


