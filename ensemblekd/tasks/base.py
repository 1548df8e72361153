"""What every task provides (the Task base class), and the parts all tasks share: each worker's
share of a split, batches that carry across shard boundaries, teacher shards read aligned with
their inputs, and the student's first run on the data.

A task is what the rows are and what is learnt from them: `classification` (a feature row, one
label, C logits) or `token` (a sequence of token ids, a next token at every position, top-k
targets). The stages never branch on it: they call the Task methods below, and the task decides.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.losses import KDLoss
from ensemblekd.store import Store


class Served(NamedTuple):
    """What the served model is: the module MLflow logs, an input example and its signature."""

    module: torch.nn.Module
    example: np.ndarray
    signature: Any                 # mlflow.models.ModelSignature
    torchscript: bool              # also save a TorchScript trace (fixed shapes break an LM, so not for every task)


class Column(NamedTuple):
    """One column of the evaluation's quality table (between model/role and params/size): its
    header, the key of the row it shows (also logged as test_<key>.<model>), and how: '%' for a
    fraction shown as a percentage, else a format spec."""

    header: str
    key: str
    fmt: str


class Task:
    """A task. Subclass it, set `name`, implement the methods, and add an instance to tasks.TASKS."""

    name = "base"
    own_keys: tuple[str, ...] = ()   # config keys only this task uses: set under another task, an error
    stores_features = False          # teachers[i].feature, student.feature and the feature terms apply
    unit = "row"                     # what the targets count: label's rate, `inspect` and the manifest's
                                     # bytes_per_<unit> use it; a label entry records its count as <unit>s
    implicit_store_info: dict[str, Any] = {}  # store_info values a store labelled before the key existed holds
    columns: tuple[Column, ...] = (Column("test acc", "accuracy", "%"), Column("fidelity", "fidelity", "%"),
                                   Column("KL", "kl", ".3f"), Column("ECE", "ece", ".3f"))
    headline = "accuracy"            # the metric evaluate.baseline's gap_closed is measured on

    # -- config and store ------------------------------------------------------------------
    def check_config(self, cfg: Config) -> None:
        """Static checks of the keys the task reads (no I/O); a UserError naming the key."""

    def store_info(self, cfg: Config) -> dict[str, Any]:
        """What the manifest records beside the task, which every label run must agree on."""
        return {}

    # -- label -------------------------------------------------------------------------------
    def read_inputs(self, cfg: Config, shard: dict[str, Any]):
        """One input shard, as label_shard takes it."""
        raise NotImplementedError

    def label_shard(self, model: torch.nn.Module, inputs, cfg: Config, teacher, device: str,
                    where: str) -> tuple[bytes, dict[str, Any]]:
        """A teacher over one input shard -> the encoded label shard and its manifest entry."""
        raise NotImplementedError

    def features(self, model: torch.nn.Module, inputs, cfg: Config, teacher, device: str, where: str) -> np.ndarray:
        """A teacher's features [N, F] on one input shard (what the PCA of store.feature_dim is fitted on)."""
        raise UserError(f"teacher '{teacher.name}': task {self.name} stores no features")

    def decode(self, table):
        """The codec's reader: one label table (a shard, or a teacher's whole split) -> its targets
        (a NamedTuple of numpy arrays; what ekd.open_store(...).targets returns)."""
        raise NotImplementedError

    def describe_store(self, manifest: dict[str, Any]) -> str:
        """What `ensemblekd inspect` says of a store's targets after its schema version."""
        return f"{manifest['num_classes']} classes, {manifest['dtype']}"

    def stored_accuracy(self, cfg: Config, store: Store, split: str, teacher: str) -> float | None:
        """A teacher's accuracy on a split from its stored targets (None without labels)."""
        raise NotImplementedError

    def labelled(self, cfg: Config, split: str, who: str) -> tuple[Any, np.ndarray]:
        """(inputs, labels) of a split's labelled rows, as a teacher kind that fits its own model takes
        them (kind sklearn: a feature matrix, or an array of texts); a UserError naming `who` if none."""
        raise UserError(f"{who}: task {self.name} has no labelled rows to fit a teacher on")

    def calibration(self, cfg: Config, rows: int, batch_size: int) -> list[Any]:
        """Batches of `rows` train rows (a seeded sample: calibration_rows), as a teacher's forward
        takes them: what student.init measures a teacher on."""
        raise UserError(f"student.init: task {self.name} cannot start a student from a teacher")

    # -- fit a teacher -------------------------------------------------------------------------
    def fit(self, model: torch.nn.Module, cfg: Config, teacher) -> None:
        """Train a torch teacher from scratch on the train split (fitting.fit_module, the task's loss)."""
        raise NotImplementedError

    def accuracy(self, model: torch.nn.Module, cfg: Config, split: str) -> float | None:
        """A model's top-1 accuracy on a split (None without labels)."""
        raise NotImplementedError

    def keep_in_store(self, cfg: Config, store: Store) -> None:
        """In the driver, once a label run has recorded the teachers: what their targets depend on
        beyond the shards, kept with Store.set_arrays (token: a teacher's vocabulary map)."""

    # -- distill -------------------------------------------------------------------------------
    def check_inputs(self, cfg: Config, shards: list, num_classes: int | None) -> None:
        """In the driver, from the input files' footers: they hold the columns the task reads, and
        (given the store's num_classes) values its targets can be trained on. A UserError naming the
        file otherwise."""

    def preflight(self, cfg: Config, store: Store, student: torch.nn.Module) -> None:
        """In the driver, before any worker: the student runs on the data and fits the stored targets."""
        raise NotImplementedError

    def student_module(self, cfg: Config, store: Store, student: torch.nn.Module) -> torch.nn.Module:
        """The module the trainer steps and checkpoints: the student itself, or the student wrapped
        with what its loss needs beside it (its `student` attribute is then the student)."""
        return student

    def batches(self, cfg: Config, store: Store, split: str, teachers: list[str], segments, batch_size: int,
                rng: np.random.Generator | None) -> Iterator:
        """Micro-batches of a worker's segments with the named teachers' targets (see row_batches)."""
        raise NotImplementedError

    def train_step(self, engine, batch, strategy, cfg: Config, epoch: int) -> tuple[KDLoss, torch.Tensor, int]:
        """(the loss of one micro-batch, not yet stepped; teacher weights [N, K]; N rows or tokens)."""
        raise NotImplementedError

    def count_correct(self, engine, batch, cfg: Config) -> tuple[int, int]:
        """(top-1 hits, targets) of the student on one evaluation batch."""
        raise NotImplementedError

    def save_student(self, cfg: Config, student_uri: str) -> str | None:
        """Write what serves the trained student without ensemblekd beside student.pt (tasks text and
        token: a save_pretrained directory, HF_STUDENT_DIR, written by save_hf_student); its path, or None."""
        return None

    def tokenizer(self, cfg: Config) -> str | None:
        """The shared tokenizer that turns text into the task's inputs (task token), if any."""
        return None

    # -- evaluate and serve --------------------------------------------------------------------
    def quality(self, cfg: Config, store: Store, teachers: list[str], others: list[str], student: torch.nn.Module,
                strategy) -> tuple[dict[str, dict[str, float | None]], int]:
        """On the test split: {model: {accuracy, fidelity, kl, ece, and the keys of `columns`}} for each
        teacher, "ensemble", each of `others` (assistants: from the store) and "student", and the
        number of targets."""
        raise NotImplementedError

    def ensemble_members(self, cfg: Config, teachers: list[str]) -> list[str]:
        """The teachers whose targets mix into the ensemble's (all; token: those of the student's
        vocabulary, a teacher with its own tokenizer being compared in bits per byte alone)."""
        return teachers

    def summary(self, ensemble: dict[str, Any], student: dict[str, Any]) -> tuple[dict[str, float | None], str | None]:
        """What the student keeps of the ensemble's quality (their report rows): values for the
        report's summary (logged as metrics), and the phrase its summary line ends with."""
        if None in (ensemble["accuracy"], student["accuracy"]):
            return {}, None
        return {}, f"{100 * (ensemble['accuracy'] - student['accuracy']):.2f} points lower test accuracy"

    def latency_inputs(self, cfg: Config) -> tuple[torch.Tensor, str | None]:
        """The test inputs that latency is timed on (batches are cut from them), and what one input
        is when a row is not the obvious unit."""
        raise NotImplementedError

    def model_inputs(self, cfg: Config, model: str, x: Any) -> Any:
        """The latency inputs as the named model reads them (x itself; token: a teacher with its own
        tokenizer gets the same test text in its own tokens)."""
        return x

    def latency_batch(self, x: Any, batch: int) -> Any:
        """`batch` latency inputs cut from x (repeated when it has fewer)."""
        return x.repeat(-(-batch // len(x)), *([1] * (x.dim() - 1)))[:batch]

    def throughput(self, x: torch.Tensor, batch: int, seconds: float) -> dict[str, float]:
        """Report values from a forward on `batch` latency inputs taking `seconds` (task token:
        tokens_per_s); none where the row is the unit."""
        return {}

    def continuations(self, cfg: Config, scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> list[dict]:
        """evaluate.prompts continued greedily by each model (its name -> inputs [1, L] to scores
        [1, L, V]): [{prompt, model, text}] (task token)."""
        return []

    def logits(self, model: torch.nn.Module, x: torch.Tensor, cfg: Config) -> torch.Tensor:
        """A model's logits [..., C] on a batch of inputs, as the ensemble mixes them."""
        return model(x)

    def served(self, cfg: Config, student: torch.nn.Module) -> Served:
        """The served model as a torch module (what log_model logs by default)."""
        raise NotImplementedError

    def log_model(self, cfg: Config, student: torch.nn.Module, name: str, tags: dict[str, str]) -> None:
        """Log the served student in the active MLflow run as the model `name`: by default `served`
        as an MLflow PyTorch model (log_torch_model)."""
        log_torch_model(self.served(cfg, student), name, tags)


TORCHSCRIPT_FILE = "student.torchscript.pt"     # the served model's TorchScript copy, under extra_files/
HF_STUDENT_DIR = "student_hf"   # beside student.pt: a Hugging Face student as save_pretrained writes it


def save_hf_student(student_uri: str, write: Callable[[str], None]) -> str:
    """The directory HF_STUDENT_DIR beside student_uri, holding what `write(local_dir)` puts there
    (a save_pretrained directory): written whole or not at all (fs.write_dir_atomic; on object
    storage config.json is uploaded last, so a cut upload is no model directory). Its URI."""
    out = fs.join(os.path.dirname(student_uri), HF_STUDENT_DIR)
    fs.write_dir_atomic(out, write, last=("config.json",))
    return out


def log_torch_model(served: Served, name: str, tags: dict[str, str]) -> None:
    """The served module as an MLflow PyTorch model: a torch.export program (pt2: no pickle, no
    ensemblekd code needed to load it) with a signature and an input example, and where the task
    allows it a TorchScript copy in extra_files/TORCHSCRIPT_FILE (torch.jit.load, from Python or
    C++ libtorch, without MLflow)."""
    import tempfile
    import warnings

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if served.torchscript:
            extra.append(os.path.join(tmp, TORCHSCRIPT_FILE))
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; libtorch still loads it
                torch.jit.save(torch.jit.trace(served.module, torch.from_numpy(served.example)), extra[0])
        mlflow.pytorch.log_model(served.module, name=name, signature=served.signature, input_example=served.example,
                                 serialization_format="pt2", extra_files=extra or None, pip_requirements=["torch"],
                                 tags=tags)


# -- shared parts --------------------------------------------------------------------------------
READ_AHEAD = 2  # shards read in background threads: a Parquet decode is mostly one thread, so two keep
                # two cores busy (reader 1.0x -> 1.7x bare pyarrow in tools/bench_speed.py's store row)
def calibration_rows(total: int, rows: int, seed: int) -> np.ndarray:
    """`rows` of a split's `total`, drawn without replacement (trainer.seed), in their order."""
    return np.sort(np.random.default_rng(seed).choice(total, size=min(rows, total), replace=False))


def worker_segments(shard_rows: list[int], num_workers: int, rank: int, seed: int, epoch: int,
                    shuffle: bool = True, drop_remainder: bool = True) -> list[tuple[int, int, int]]:
    """This worker's rows of an epoch as (shard, start, stop) segments.

    Shards are put in a seeded order for the epoch and their rows concatenated; worker r takes
    the r-th contiguous slice, so workers never overlap and each reads only the shards its
    slice touches. With drop_remainder every worker gets floor(N / W) rows (equal step counts,
    which data-parallel training needs); the few rows left over differ from epoch to epoch.
    """
    order = list(range(len(shard_rows)))
    if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(order)
    total = sum(shard_rows)
    if drop_remainder:
        per = total // num_workers
        lo, hi = rank * per, (rank + 1) * per
    else:
        lo, hi = rank * total // num_workers, (rank + 1) * total // num_workers
    segments, pos = [], 0
    for s in order:
        start, stop = max(lo, pos), min(hi, pos + shard_rows[s])
        if start < stop:
            segments.append((s, start - pos, stop - pos))
        pos += shard_rows[s]
    return segments


def row_batches(segments, read_shard: Callable[[int], Any], batch_size: int,
                rng: np.random.Generator | None) -> Iterator[list[tuple[Any, np.ndarray]]]:
    """Batches over segments as lists of (shard data, row indices) pieces: rows of one shard, or of
    two where a batch spans a shard boundary (the short rest of one shard is carried into the
    next); the last batch may be short. Rows are shuffled within each segment when rng is given.

    The next READ_AHEAD segments' shards are read (decoded, checksums verified) in background
    threads while this one's batches are used, so reading overlaps training and itself.
    Memory: 1 + READ_AHEAD shards plus one batch.
    """
    segments = list(segments)
    pending: list[tuple[Any, np.ndarray]] = []
    count = 0
    with ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="ekd-read-ahead") as reader:
        upcoming = deque(reader.submit(read_shard, s[0]) for s in segments[:READ_AHEAD])
        for k, (shard, start, stop) in enumerate(segments):
            data = upcoming.popleft().result()
            if k + READ_AHEAD < len(segments):
                upcoming.append(reader.submit(read_shard, segments[k + READ_AHEAD][0]))
            rows = np.arange(start, stop)
            if rng is not None:
                rows = rng.permutation(rows)
            pos = 0
            while pos < len(rows):
                take = rows[pos:pos + batch_size - count]
                pos += len(take)
                pending.append((data, take))
                count += len(take)
                if count == batch_size:
                    yield pending
                    pending, count = [], 0
    if pending:
        yield pending


def gather(pieces: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The rows `idx` of each array, one after another, in one copy (a batch within one shard is
    taken straight out of it; the hot path of the trainer's reader)."""
    if len(pieces) == 1:
        array, idx = pieces[0]
        return array[idx]
    return np.concatenate([array[idx] for array, idx in pieces])


def read_aligned(store: Store, split: str, shard: int, teachers: list[str], decode: Callable, ids: np.ndarray,
                 same: Callable[[Any], bool] = lambda targets: True) -> list:
    """Each teacher's decoded shard, refused unless it carries the input's ids (and `same` holds):
    an input that changed since labelling must not meet stale targets."""
    out = []
    for name in teachers:
        targets = decode(store.read_table(split, name, shard))
        if not np.array_equal(targets.ids, ids) or not same(targets):
            raise UserError(f"{store.uri}: {split} shard {shard} of teacher '{name}' is not aligned with its input "
                            "(ids differ); the input changed since labelling: re-run label")
        out.append(targets)
    return out


def run_on(model: torch.nn.Module, inputs: torch.Tensor, who: str = "student.model") -> torch.Tensor:
    """A model's output on a little of the data, or a one-line UserError if it cannot run on it
    (checked before training, so the error names the model rather than a worker's traceback)."""
    try:
        with torch.no_grad():
            return model(inputs)
    except (RuntimeError, IndexError) as exc:
        raise UserError(f"{who}: fails on the data ({str(exc).splitlines()[0]}); check data.features (or the "
                        "sequence length) against its kwargs") from None
