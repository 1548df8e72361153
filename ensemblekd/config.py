"""Typed run configuration, checked at load time.

A YAML file is read, `--set key.path=value` overrides are applied to the raw mapping, and the
result is validated by pydantic models with `extra="forbid"`. Cross-field checks (teacher names,
import paths, files that must exist, static weights) run right after, so every mistake is an
error before any work starts, reported on one line that names the key and the fix.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    model_validator,
)

from ensemblekd.errors import UserError
from ensemblekd.storage import (
    check_reachable,
    configure_for,
    exists,
    is_remote,
    resolve_uri,
)
from ensemblekd.weighting import STRATEGIES, WEIGHTINGS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: str = Field(description="Parquet file or directory of shards (any fsspec URI)")
    val: str
    test: str
    features: str = Field(default="x", description="classification: list<float> per row; task token: the "
                          "list<int32> token ids of each sequence")
    label: str | None = "y"
    id: str = "id"
    loss_mask: str | None = Field(default="loss_mask", description="task token: optional list<bool> per sequence, "
                                  "the tokens trained on (used when the column exists)")
    vocab_size: int | None = Field(default=None, ge=2, description="task token: the shared vocabulary; teacher "
                                   "logits padded past it are cut to it")
    tokenizer: str | None = Field(default=None, description="task token: local tokenizer directory, or 'teachers' "
                                  "(each pretrained teacher's own); its vocabulary hash is kept in the store")
    prepare: Literal["digits", "breast_cancer", "wine", "iris", "markov"] | None = Field(
        default=None, description="write this built-in data set to the split paths when missing"
    )


class FitConfig(_Section):
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0


class TeacherConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str | None = Field(default=None, description="'module:callable' returning a torch.nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = Field(default=None, description="task token: a local Hugging Face model directory "
                                   "(from_pretrained; nothing is downloaded), instead of model + checkpoint")
    checkpoint: str | None = None
    fit: FitConfig | None = None
    replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=1024, ge=1)
    group: str | None = Field(default=None, description="label: teachers with the same group share each actor "
                              "(one read of every input shard for all of them); they must share replicas, "
                              "num_cpus and num_gpus")


class StoreConfig(_Section):
    uri: str
    dtype: Literal["float16", "float32"] = "float16"
    top_k: int = Field(default=32, ge=1, description="task token: log-probs kept per token (plus the tail mass); "
                       ">= the vocabulary keeps the full distribution")
    compression_level: int = Field(default=3, ge=1, le=22, description="task token: zstd level of the token "
                                   "shards; 19 is ~11% smaller and ~30x slower to write")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the store's protocol, e.g. {endpoint_url: ...}"
    )

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


class StudentConfig(_Section):
    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class AssistantConfig(_Section):
    """A teacher-assistant level (TAKD): distilled, then labelled into the store like a teacher."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=1024, ge=1)


class DistillConfig(_Section):
    strategy: str = "parallel"
    weighting: str = "uniform"
    weights: dict[str, float] | None = Field(
        default=None, description="per-teacher weights for weighting: static"
    )
    gamma: float = Field(default=1.0, ge=0, description="weighting: accuracy sharpening, w_k ∝ acc_k^gamma")
    mix_space: Literal["prob", "logit"] = "prob"
    # sequential
    order: Literal["config", "ascending_accuracy", "descending_accuracy"] = "config"
    cumulative: bool = False
    stage_epochs: list[int] | None = Field(default=None, description="epochs per stage; default: split evenly")
    # assistant (TAKD)
    assistants: list[AssistantConfig] = Field(default_factory=list, description="largest first, down to the student")
    ensemble_blend: float = Field(default=0.0, ge=0, le=1, description="share of the ensemble kept at every level")
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)


class TrainerConfig(_Section):
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    use_gpu: bool = False
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=64, ge=1, description="global batch, split across workers")
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    zero_stage: int = Field(default=0, ge=0, le=3)
    seed: int = 0
    max_failures: int = Field(default=2, ge=-1, description="worker failures survived by resuming from the "
                              "last epoch's checkpoint (Ray Train FailureConfig); -1: no limit")
    output_dir: str = "runs/ensemblekd"
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="merged over the generated DeepSpeed config"
    )


class TrackingConfig(_Section):
    uri: str | None = None
    experiment: str = "ensemblekd"
    run_name: str | None = None


class RayConfig(_Section):
    address: str | None = Field(default=None, description="None: start local Ray; 'auto': join")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs for a local Ray")


class Config(_Section):
    task: Literal["classification", "token"] = Field(
        default="classification", description="token: causal LMs distilled token by token from top-k targets")
    data: DataConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    store: StoreConfig
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [t.name for t in self.teachers]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"teachers: the name '{name}' is used twice; give each teacher a unique name")
        if self.distill.strategy not in STRATEGIES:
            raise ValueError(
                f"distill.strategy: unknown '{self.distill.strategy}'; choose one of {sorted(STRATEGIES)}"
            )
        if self.distill.weighting not in WEIGHTINGS:
            raise ValueError(
                f"distill.weighting: unknown '{self.distill.weighting}'; choose one of {sorted(WEIGHTINGS)}"
            )
        if self.distill.weighting == "static":
            given = set(self.distill.weights or {})
            if given != set(names):
                raise ValueError(
                    f"distill.weights: weighting 'static' needs one weight per teacher {sorted(names)}, got {sorted(given)}"
                )
            if any(w < 0 for w in self.distill.weights.values()) or sum(self.distill.weights.values()) <= 0:
                raise ValueError("distill.weights: weights must be >= 0 with a positive sum")
        elif self.distill.weights is not None:
            raise ValueError("distill.weights: only used with weighting: static; remove it or set distill.weighting=static")
        d = self.distill
        if d.strategy == "sequential" and d.stage_epochs is not None:
            if len(d.stage_epochs) != len(names) or sum(d.stage_epochs) != self.trainer.epochs or min(d.stage_epochs) < 1:
                raise ValueError(f"distill.stage_epochs: needs one positive entry per teacher ({len(names)}) "
                                 f"summing to trainer.epochs ({self.trainer.epochs}), got {d.stage_epochs}")
        if d.strategy == "sequential" and self.trainer.epochs < len(names):
            raise ValueError(f"trainer.epochs: sequential needs at least one epoch per teacher ({len(names)})")
        if d.strategy != "sequential" and (d.stage_epochs or d.cumulative or d.order != "config"):
            raise ValueError("distill.order/cumulative/stage_epochs: only used with strategy: sequential")
        if d.strategy != "assistant" and (d.assistants or d.ensemble_blend):
            raise ValueError("distill.assistants/ensemble_blend: only used with strategy: assistant")
        for a in d.assistants:
            if a.name in names or [x.name for x in d.assistants].count(a.name) > 1:
                raise ValueError(f"distill.assistants: the name '{a.name}' is taken; give each assistant a unique name")
        if self.trainer.batch_size % self.trainer.num_workers:
            raise ValueError(
                f"trainer.batch_size: {self.trainer.batch_size} does not split evenly over "
                f"{self.trainer.num_workers} workers; use a multiple of trainer.num_workers"
            )
        for i, t in enumerate(self.teachers):
            if (t.model is None) == (t.pretrained is None):
                raise ValueError(f"teachers.{i}: teacher '{t.name}' needs either model (+ checkpoint or fit) or pretrained")
            if t.pretrained and (t.checkpoint or t.fit or t.kwargs):
                raise ValueError(f"teachers.{i}.pretrained: a pretrained directory brings its own weights; "
                                 "remove checkpoint, fit and kwargs")
            if t.model and t.checkpoint is None and t.fit is None:
                raise ValueError(
                    f"teachers.{i}.checkpoint: teacher '{t.name}' needs a checkpoint URI or a fit block"
                )
        groups: dict[str, TeacherConfig] = {}
        for t in self.teachers:
            first = groups.setdefault(t.group, t) if t.group else t
            if (t.replicas, t.num_cpus, t.num_gpus) != (first.replicas, first.num_cpus, first.num_gpus):
                raise ValueError(f"teachers: '{t.name}' and '{first.name}' share group '{t.group}' (one actor pool) "
                                 "but not replicas/num_cpus/num_gpus; give them the same values")
        self._task_checks()
        return self

    def _task_checks(self) -> None:
        d, token = self.data, self.task == "token"
        if token and d.vocab_size is None:
            raise ValueError("data.vocab_size: task token needs the shared vocabulary size (e.g. 32000)")
        if token and self.distill.mix_space == "logit":
            raise ValueError("distill.mix_space: task token mixes per-teacher top-k targets in probability space; "
                             "use mix_space: prob")
        if d.prepare and (d.prepare == "markov") != token:
            raise ValueError(f"data.prepare: '{d.prepare}' is a data set for task "
                             f"{'token' if d.prepare == 'markov' else 'classification'}; this config has task {self.task}")
        if not token and (d.vocab_size or d.tokenizer or any(t.pretrained for t in self.teachers)):
            raise ValueError("data.vocab_size/tokenizer and teachers.pretrained: only used with task: token")
        if d.tokenizer == "teachers" and not any(t.pretrained for t in self.teachers):
            raise ValueError("data.tokenizer: 'teachers' needs pretrained teachers; give a tokenizer directory or null")

    def teacher_checkpoint(self, teacher: TeacherConfig) -> str:
        """Where a teacher's weights live: its checkpoint, or the default place `fit` writes to."""
        return teacher.checkpoint or os.path.join(self.trainer.output_dir, "teachers", f"{teacher.name}.pt")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def import_callable(path: str, key: str):
    """Resolve 'module:callable'; a UserError that names the key when it does not resolve."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{key}: '{path}' is not of the form 'module:callable' (e.g. ensemblekd.models:mlp)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{key}: cannot import module '{module_name}' ({exc}); check the path or install it") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{key}: module '{module_name}' has no callable '{attr}'")
    return fn


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (value parsed as YAML; list items by index)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set '{item}': expected key.path=value, e.g. --set trainer.epochs=3")
        node: Any = raw
        parts = key.split(".")
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


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key; remove it or check its spelling"
    if err["type"] == "missing":
        return f"{where}: required key is missing; add it to the config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        return msg
    return f"{where}: {msg} (got {err.get('input')!r})"


def _absolute_paths(cfg: Config) -> None:
    """Local paths become absolute so Ray workers (other cwd) see the same files."""
    for section, key in [("data", "train"), ("data", "val"), ("data", "test"), ("store", "uri"), ("trainer", "output_dir")]:
        obj = getattr(cfg, section)
        setattr(obj, key, resolve_uri(getattr(obj, key)))
    for t in cfg.teachers:
        if t.checkpoint:
            t.checkpoint = resolve_uri(t.checkpoint)
        if t.pretrained:
            t.pretrained = resolve_uri(t.pretrained)
    if cfg.data.tokenizer and cfg.data.tokenizer != "teachers":
        cfg.data.tokenizer = resolve_uri(cfg.data.tokenizer)


def check_inputs(cfg: Config, check_data: bool = True) -> None:
    """The checks that touch the outside world: import paths, files that must exist, the store's
    object store (endpoint, credentials, bucket)."""
    check_reachable(cfg.store.uri, "store.uri")
    for i, t in enumerate(cfg.teachers):
        if t.pretrained:
            if not exists(os.path.join(t.pretrained, "config.json")):
                raise UserError(f"teachers.{i}.pretrained: '{t.pretrained}' is not a Hugging Face model directory "
                                "(no config.json); save one with save_pretrained")
            continue
        import_callable(t.model, f"teachers.{i}.model")
        if t.fit is None and not exists(cfg.teacher_checkpoint(t)):
            raise UserError(f"teachers.{i}.checkpoint: '{t.checkpoint}' does not exist; fix the path or add a fit block")
    import_callable(cfg.student.model, "student.model")
    for i, a in enumerate(cfg.distill.assistants):
        import_callable(a.model, f"distill.assistants.{i}.model")
    if check_data and cfg.data.prepare is None:
        for split in ("train", "val", "test"):
            uri = getattr(cfg.data, split)
            if not exists(uri):
                raise UserError(f"data.{split}: '{uri}' does not exist; fix the path or set data.prepare")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, check: bool = True) -> Config:
    path = Path(path)
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
        raise UserError(f"{path}: {_format_error(exc)}") from None
    _absolute_paths(cfg)
    configure_for(cfg)
    if check:
        check_inputs(cfg)
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


