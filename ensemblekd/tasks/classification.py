"""task: classification — a row of features, one label, C logits per teacher.

Label shards hold raw logits (not softened: temperature is a training choice): `id` int64 and
`logits` fixed_size_list<float16|float32>[C], row-aligned with the input shard, and for a teacher
with a `feature`, `features` fixed_size_list<float16>[d] (ensemblekd.features). The student trains
on `losses.kd_loss` (the configured divergence) against the strategy's mixed target, plus the
feature and relation terms when configured; evaluation reads the teachers' test logits from the
store and runs the student.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ensemblekd.config import Config
from ensemblekd.data.inputs import (InputShard, check_columns, features_to_numpy, label_span, labelled_split,
                                    negative_labels, read_shard, read_split)
from ensemblekd.errors import UserError
from ensemblekd.features import feature_terms, student_with_features
from ensemblekd.fitting import fit_module
from ensemblekd.losses import IGNORE, KDLoss, divergence, kd_loss
from ensemblekd.metrics import accuracy, expected_calibration_error, mean_kl
from ensemblekd.store import Store, pack
from ensemblekd.tasks.base import Served, Task, calibration_rows, gather, read_aligned, row_batches, run_on


class Logits(NamedTuple):
    ids: np.ndarray                  # int64 [N]
    logits: np.ndarray               # [N, C] as stored (float16 or float32)
    features: np.ndarray | None      # float16 [N, d], for a teacher that stores its feature


def _fixed_lists(values: np.ndarray, arrow_type) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=arrow_type), values.shape[1])


def encode(ids: np.ndarray, logits: np.ndarray, dtype: str, features: np.ndarray | None = None) -> tuple[bytes, dict[str, Any]]:
    """Parquet bytes of one label shard and its manifest entry (rows, bytes, sha256)."""
    arrow_type = pa.float16() if dtype == "float16" else pa.float32()
    columns = {"id": pa.array(ids, pa.int64()), "logits": _fixed_lists(logits.astype(np.dtype(dtype), copy=False),
                                                                      arrow_type)}
    if features is not None:
        columns["features"] = _fixed_lists(features.astype(np.float16), pa.float16())
    return pack(pa.table(columns))


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table[name].combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def decode(table: pa.Table) -> Logits:
    features = _column(table, "features") if "features" in table.column_names else None
    return Logits(table["id"].to_numpy().astype(np.int64), _column(table, "logits"), features)


@torch.no_grad()
def predict(module: torch.nn.Module, x: np.ndarray, batch_size: int = 1024, device: str = "cpu",
            as_inputs: Callable[[np.ndarray], Any] = torch.from_numpy) -> np.ndarray:
    """float32 logits [N, C] of a model over inputs x (features [N, F]), batch_size rows at a time."""
    return predict_outputs(module, x, batch_size, device, as_inputs)[0]


@torch.no_grad()
def predict_outputs(module: torch.nn.Module, x: np.ndarray, batch_size: int = 1024, device: str = "cpu",
                    as_inputs: Callable[[np.ndarray], Any] = torch.from_numpy) -> list[np.ndarray]:
    """Each output of a model over inputs x (features [N, F]; as_inputs makes a batch of them what
    the model takes) as float32 arrays: [logits] or, for a teacher with a feature
    (features.WithFeatures), [logits, features]."""
    parts = []
    for i in range(0, len(x), batch_size):
        batch = as_inputs(x[i:i + batch_size])
        out = module(batch.to(device) if isinstance(batch, torch.Tensor) else batch)
        parts.append([o.float().cpu() for o in (out if isinstance(out, tuple) else (out,))])
    if not parts:
        return [np.zeros((0, 0), np.float32)]
    return [torch.cat(column).numpy() for column in zip(*parts)]


def grouped_by_label(y: np.ndarray) -> bool:
    """Whether a shard's labels come in runs (sorted by label, or by something that decides it):
    fewer than a quarter of the label changes a random order of them would have."""
    y = y[y >= 0]
    if len(y) < 32:
        return False
    share = np.unique(y, return_counts=True)[1] / len(y)
    expected = (len(y) - 1) * (1 - (share ** 2).sum())
    return expected > 8 and int((y[1:] != y[:-1]).sum()) < expected / 4


class Rows(NamedTuple):
    """One input shard for training: inputs, labels (IGNORE where none) and the teachers' logits."""

    x: np.ndarray        # [N, F] float32, read-only (a view of Arrow's buffer); task text: [N] str
    y: np.ndarray        # [N] int64
    z: np.ndarray        # [N, K, C] float32
    f: np.ndarray        # [N, d_1 + ... + d_K] float32: the teachers' features side by side ([N, 0]: none read)


class Classification(Task):
    """A row of inputs, one label, C logits per teacher. What a row's input is (a feature vector
    here, a text in task text) is said by four members that a subclass may change: input_key,
    to_inputs, as_inputs and on_device; everything else is shared."""

    name = "classification"
    stores_features = True
    input_key = "data.features"                  # the config key that names the input column
    to_inputs = staticmethod(features_to_numpy)  # that column -> an array of inputs [N, ...]

    def input_column(self, cfg: Config) -> str:
        return cfg.data.features

    def as_inputs(self, x: np.ndarray) -> Any:
        """An array of inputs as the models take them (a batch): a float tensor [N, F]."""
        return torch.from_numpy(x)

    def on_device(self, batch: Any, device) -> Any:
        """A batch moved to the device a model runs on."""
        return batch.to(device)

    def read(self, cfg: Config, shard: dict[str, Any], label: bool = True, writable: bool = True,
             scan: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, inputs, labels) of one input shard (labels IGNORE without data.label or label)."""
        return read_shard(InputShard.of(shard), self.input_column(cfg), cfg.data.label if label else None, cfg.data.id,
                          writable, scan, self.to_inputs, self.input_key)

    def read_split(self, cfg: Config, split: str, label: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, inputs, labels) of a whole (small) split."""
        return read_split(getattr(cfg.data, split), self.input_column(cfg), cfg.data.label if label else None,
                          cfg.data.id, self.to_inputs, self.input_key)

    def labelled(self, cfg: Config, split: str, who: str) -> tuple[np.ndarray, np.ndarray]:
        return labelled_split(cfg.data, split, who, self.input_column(cfg), self.to_inputs, self.input_key)

    def calibration(self, cfg: Config, rows: int, batch_size: int) -> list[Any]:
        x = self.read_split(cfg, "train", label=False)[1]
        x = x[calibration_rows(len(x), rows, cfg.trainer.seed)]
        return [self.as_inputs(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]

    def predict(self, model: torch.nn.Module, x: np.ndarray, batch_size: int = 1024, device: str = "cpu") -> np.ndarray:
        return predict(model, x, batch_size, device, self.as_inputs)

    def check_config(self, cfg: Config) -> None:
        d = cfg.data
        if d.vocab_size or d.tokenizer:
            raise UserError("data.vocab_size/tokenizer: only used with task: token")

    # -- label -------------------------------------------------------------------------------
    def decode(self, table: pa.Table) -> Logits:
        return decode(table)

    def read_inputs(self, cfg: Config, shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        ids, x, _ = self.read(cfg, shard, label=False)
        return ids, x

    def label_shard(self, model, inputs, cfg: Config, teacher, device: str, where: str):
        ids, x = inputs
        logits, *features = self._outputs(model, x, teacher, device, where)
        if logits.ndim != 2 or len(logits) != len(ids):
            raise UserError(f"teacher '{teacher.name}' returned shape {tuple(logits.shape)} on {where}; "
                            "expected [rows, classes]")
        if not np.isfinite(logits).all():
            raise UserError(f"teacher '{teacher.name}' produced NaN/Inf logits on {where}; fix the teacher or its "
                            "checkpoint")
        feature = features[0] if features else None
        if feature is not None and not np.isfinite(feature.astype(np.float16)).all():
            raise UserError(f"teacher '{teacher.name}': its feature '{teacher.feature}' holds NaN/Inf or values beyond "
                            f"float16 (max |f| {np.abs(feature).max():.3g}) on {where}; name a normalised module, or "
                            "set store.feature_dim")
        data, entry = encode(ids, logits, cfg.store.dtype, feature)
        extra = {} if feature is None else {"feature_dim": int(feature.shape[1])}
        return data, {**entry, **extra, "num_classes": int(logits.shape[1]), "dtype": cfg.store.dtype}

    def _outputs(self, model, x: np.ndarray, teacher, device: str, where: str) -> list[np.ndarray]:
        try:
            return predict_outputs(model, x, teacher.batch_size, device, self.as_inputs)
        except RuntimeError as exc:
            raise UserError(f"teacher '{teacher.name}' failed on {where} ({str(exc).splitlines()[0]}); "
                            f"check {self.input_key} matches the model's input") from None

    def features(self, model, inputs, cfg: Config, teacher, device: str, where: str) -> np.ndarray:
        return self._outputs(model, inputs[1], teacher, device, where)[1]

    def split_logits(self, cfg: Config, store: Store, split: str, teacher: str, ids: np.ndarray) -> np.ndarray:
        """A teacher's float32 logits for a whole (small) split, checked against the input ids."""
        parts = [decode(store.read_table(split, teacher, i)) for i in range(len(store.inputs(split)))]
        if not np.array_equal(np.concatenate([p.ids for p in parts]), ids):
            raise UserError(f"{store.uri}: {split} logits of '{teacher}' are not aligned with the data; re-run label")
        return np.concatenate([p.logits for p in parts]).astype(np.float32)

    def stored_accuracy(self, cfg: Config, store: Store, split: str, teacher: str) -> float | None:
        if not cfg.data.label:
            return None
        ids, _, y = self.read_split(cfg, split)
        return accuracy(self.split_logits(cfg, store, split, teacher, ids).argmax(1), y)

    # -- fit a teacher -------------------------------------------------------------------------
    def fit(self, model, cfg: Config, teacher) -> None:
        x, y = (torch.from_numpy(a) for a in self.labelled(cfg, "train", f"teacher '{teacher.name}'"))
        classes = run_on(model, x[:2], f"teacher '{teacher.name}'").shape[-1]
        if y.max() >= classes:
            raise UserError(f"data.train: labels reach {int(y.max())}, but teacher '{teacher.name}' outputs {classes} "
                            "classes; fix the labels or the teacher's kwargs")
        f = teacher.fit
        fit_module(model, len(y), lambda idx: F.cross_entropy(model(x[idx]), y[idx]), f.epochs, f.lr, f.batch_size,
                   f.seed, f.weight_decay)

    def accuracy(self, model, cfg: Config, split: str) -> float | None:
        _, x, y = self.read_split(cfg, split)
        return accuracy(self.predict(model, x).argmax(1), y)

    # -- distill -------------------------------------------------------------------------------
    def check_inputs(self, cfg: Config, shards: list[InputShard], num_classes: int | None) -> None:
        d = cfg.data
        check_columns(shards, {self.input_key: self.input_column(cfg), "data.label": d.label})
        for shard in shards if d.label and num_classes else []:
            assert d.label is not None and num_classes is not None  # the loop runs only with both
            span = label_span([shard], d.label)
            if span and IGNORE != span[0] < 0:
                raise negative_labels(shard.uri, d.label, span[0])
            if span and span[1] >= num_classes:
                raise UserError(f"{shard.uri}: labels in '{d.label}' reach {span[1]}, but the teachers output "
                                f"{num_classes} classes (0..{num_classes - 1}); fix the labels or the teachers")

    def preflight(self, cfg: Config, store: Store, student) -> None:
        _, x, _ = self.read(cfg, store.inputs("val")[0], label=False)
        out = run_on(student, self.as_inputs(x[:2]))
        if out.shape[-1] != store.num_classes:
            raise UserError(f"student.model: outputs {out.shape[-1]} classes but the teachers have {store.num_classes}; "
                            "fix student.kwargs")
        if cfg.distill.feature_terms:
            store.feature_dims([t.name for t in cfg.teachers])
            self.student_module(cfg, store, student)
        shard = store.inputs("train")[0]
        if cfg.data.label and grouped_by_label(self.read(cfg, shard)[2]):
            print(f"distill: note: {shard['uri']} holds its rows grouped by label; the trainer shuffles rows within a "
                  "shard only, so its batches would hold one or two classes: write the rows in a random order",
                  file=sys.stderr, flush=True)

    def student_module(self, cfg: Config, store: Store, student: torch.nn.Module) -> torch.nn.Module:
        """The module the trainer steps: the student, wrapped with its feature tap and hint
        projections (features.StudentWithFeatures) when the run has feature terms."""
        if not cfg.distill.feature_terms:
            return student
        dims = store.feature_dims([t.name for t in cfg.teachers])
        _, x, _ = self.read(cfg, store.inputs("val")[0], label=False)
        assert cfg.student.feature is not None  # the config requires it with feature terms
        return student_with_features(student, cfg.student.feature, dims, bool(cfg.distill.hint_weight),
                                     torch.from_numpy(x[:2]))

    def read_rows(self, cfg: Config, store: Store, split: str, shard: int, teachers: list[str]) -> Rows:
        """One input shard and its teachers' logits (and features, when the run learns from them),
        alignment checked by id. Not scanned for NaN: the label stage did, and distill's preflight
        checks the inputs are unchanged since."""
        ids, x, y = self.read(cfg, store.inputs(split)[shard], writable=False, scan=False)
        found = read_aligned(store, split, shard, teachers, decode, ids)
        z = np.stack([t.logits for t in found], axis=1, dtype=np.float32) if found else np.zeros((len(y), 0, 0), np.float32)
        with_features = cfg.distill.feature_terms and found
        f = (np.concatenate([t.features for t in found], axis=1, dtype=np.float32) if with_features
             else np.zeros((len(y), 0), np.float32))
        return Rows(x, y, z, f)

    def batches(self, cfg: Config, store: Store, split: str, teachers: list[str], segments, batch_size: int, rng):
        """(inputs (as_inputs), y, teacher logits, teacher features) per micro-batch; the last three
        float32 tensors."""
        for pieces in row_batches(segments, lambda s: self.read_rows(cfg, store, split, s, teachers), batch_size, rng):
            x, *rest = (gather([(getattr(rows, f), idx) for rows, idx in pieces]) for f in Rows._fields)
            yield (self.as_inputs(x), *(torch.from_numpy(a) for a in rest))

    def train_step(self, engine, batch, strategy, cfg: Config, epoch: int):
        d = cfg.distill
        x, (y, z, f) = self.on_device(batch[0], engine.device), (t.to(engine.device) for t in batch[1:])
        targets, weights = strategy.targets(z, y, d.temperature, epoch)
        out = kd_loss(engine(x), targets, y, d.temperature, d.alpha, divergence(d))
        if d.feature_terms:
            out = self._with_feature_terms(out, engine.module, f, weights, d)
        return out, weights, len(y)

    @staticmethod
    def _with_feature_terms(out: KDLoss, student, f: torch.Tensor, weights: torch.Tensor, d) -> KDLoss:
        """The loss plus hint_weight·hint + rkd_distance_weight·distance + rkd_angle_weight·angle."""
        terms = feature_terms(student, student.split(f), weights, bool(d.hint_weight), bool(d.rkd_distance_weight),
                              bool(d.rkd_angle_weight))
        scale = {"hint": d.hint_weight, "rkd_distance": d.rkd_distance_weight, "rkd_angle": d.rkd_angle_weight}
        return out._replace(loss=out.loss + sum(scale[n] * t for n, t in terms.items()), terms=terms)

    def count_correct(self, engine, batch, cfg: Config) -> tuple[int, int]:
        x, y, *_ = batch
        pred = engine(self.on_device(x, engine.device)).argmax(-1).cpu()
        keep = y >= 0
        return int((pred[keep] == y[keep]).sum()), int(keep.sum())

    # -- evaluate and serve --------------------------------------------------------------------
    def quality(self, cfg: Config, store: Store, teachers: list[str], others: list[str], student, strategy):
        ids, x, y = self.read_split(cfg, "test")
        logits = {n: self.split_logits(cfg, store, "test", n, ids) for n in [*teachers, *others]}
        p_ens = strategy.targets(torch.from_numpy(np.stack([logits[n] for n in teachers], axis=1)), None, 1.0)[0].numpy()
        logits["student"] = self.predict(student, x)

        def measure(z: np.ndarray) -> dict[str, float | None]:
            return {"accuracy": accuracy(z.argmax(1), y), "fidelity": float((z.argmax(1) == p_ens.argmax(1)).mean()),
                    "kl": mean_kl(p_ens, z),
                    "ece": expected_calibration_error(torch.softmax(torch.from_numpy(z), -1).numpy(), y)}

        out = {name: measure(z) for name, z in logits.items()}
        out["ensemble"] = {"accuracy": accuracy(p_ens.argmax(1), y), "fidelity": 1.0, "kl": 0.0,
                           "ece": expected_calibration_error(p_ens, y)}
        return out, len(y)

    def latency_inputs(self, cfg: Config) -> tuple[torch.Tensor, str | None]:
        return self.as_inputs(self.read_split(cfg, "test", label=False)[1]), None

    def served(self, cfg: Config, student) -> Served:
        """softmax(student(x)) at T = 1 (the temperature only softens training targets): float32
        [-1, F] -> class probabilities [-1, C]; 4 validation rows as the example."""
        from mlflow.models import infer_signature

        model = torch.nn.Sequential(student, torch.nn.Softmax(dim=-1)).eval()
        _, x, _ = read_split(cfg.data.val, cfg.data.features, None, cfg.data.id)
        example = x[:4]
        with torch.no_grad():
            signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
        return Served(model, example, signature, torchscript=True)


__all__ = ["Classification", "decode", "encode", "predict"]
