"""The soft-target store: the contract between labelling and distillation.

Layout on any fsspec URI:

    STORE/manifest.json
    STORE/_commits/NNNNNNNN.json                  shards committed since manifest.json was last written whole
    STORE/<split>/<teacher>/part-NNNNN.parquet    columns: id int64 and the task's targets (its codec:
                                                  classification: logits fixed_size_list<fp16|fp32>[C];
                                                  token: top-k log-probs, ids and tail mass per position)

Shard NNNNN of a teacher is row-aligned with input shard NNNNN of the split and carries the
input `id`, so alignment can be checked. Raw logits are stored (temperature is a training
choice). A shard file appears whole (write-then-rename; a single PUT on object stores) and is
only trusted once the manifest lists it with its rows, bytes and sha256; the manifest is written
by the driver alone, after the shards it lists.

While a label run goes, the driver does not rewrite the whole manifest about once a second (at
10,000 shards x 8 teachers that is 37 MB and seconds of JSON each time): it appends the entries
committed since its last save as one small log object, `_commits/NNNNNNNN.json`, which appears whole
like a shard. Store.open replays the log objects after the manifest's `log_seq` in order, so a reader
(or a run resumed after a crash) sees every committed shard; the end of the run writes the manifest
whole, with the new `log_seq`, and deletes the log objects it holds.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from ensemblekd.errors import UserError
from ensemblekd.io import fs

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COMMITS = "_commits"  # the commit log: NNNNNNNN.json, each {"seq": N, "commits": [[split, teacher, index, entry]]}
LOCK = "label.lock"
LOCK_STALE_S = 120.0  # a holder on another host that has not refreshed its lock for this long is gone


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def pack(table: pa.Table, **parquet_options) -> tuple[bytes, dict[str, Any]]:
    """Parquet bytes of one label shard and its manifest entry (rows, bytes, sha256): every task's
    codec ends here."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_options)
    data = buf.getvalue()
    return data, {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def unpack(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


# -- the manifest's shape, checked whenever a store is opened ---------------------------------
class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")


class _InputEntry(_Entry):
    uri: str
    rows: StrictInt
    bytes: StrictInt
    offset: StrictInt


class _TeacherEntry(_Entry):
    fingerprint: str
    spec: dict[str, Any]


class _ShardEntry(_Entry):
    rows: StrictInt
    bytes: StrictInt
    sha256: str


class _Manifest(_Entry):
    schema_version: StrictInt
    task: str | None
    num_classes: StrictInt | None
    dtype: str | None
    inputs: dict[str, list[_InputEntry]]
    teachers: dict[str, _TeacherEntry]
    shards: dict[str, dict[str, dict[str, _ShardEntry]]]


def check_manifest(manifest: Any, path: str) -> None:
    """A UserError naming the first thing wrong with a manifest's shape (a hand edit, another tool's
    file, a truncated copy): nothing reads a manifest that is not one."""
    fix = "restore the file, or use a new store.uri and relabel"
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a store manifest (a JSON {type(manifest).__name__}, not an object); {fix}")
    version = manifest.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
        raise UserError(f"{path}: store schema version {version}, this ensemblekd reads {SCHEMA_VERSION}; relabel into a "
                        "new store.uri")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{path}: not a store manifest ({where}: {err['msg'].lower()}, got {err.get('input')!r:.60}); "
                        f"{fix}") from None


def same_input(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether an input shard is the one that was labelled: same rows, bytes, place in the split and
    footer fingerprint (a moved file is still the same input; a manifest from before footers were
    recorded is compared on the rest)."""
    keys = ["rows", "bytes", "offset"] + (["footer"] if recorded.get("footer") and current.get("footer") else [])
    return all(recorded.get(k) == current.get(k) for k in keys)


class Store:
    """The manifest in memory plus the shard I/O around it. Only the driver calls `save`."""

    def __init__(self, uri: str, manifest: dict[str, Any]):
        self.uri = uri
        self.manifest = manifest
        self.unsaved: list[list[Any]] = []  # commits since the last save, as commit() was given them
        self.log_seq = manifest.get("log_seq", 0)  # the last commit-log object written or replayed

    # -- opening and saving -------------------------------------------------------------
    @classmethod
    def open(cls, uri: str, create: bool = False) -> Store:
        path = fs.join(uri, MANIFEST)
        if fs.exists(path):
            try:
                manifest = json.loads(fs.read_bytes(path))
            except ValueError:
                raise UserError(f"{path}: the manifest is not valid JSON; restore the file, or use a new store.uri "
                                "and relabel") from None
            check_manifest(manifest, path)
            store = cls(uri, manifest)
            store._replay()
            return store
        if not create:
            raise UserError(f"no soft-target store at '{uri}' (no {MANIFEST}); run 'ensemblekd label CONFIG' first")
        return cls(uri, {"schema_version": SCHEMA_VERSION, "task": None, "num_classes": None,
                         "dtype": None, "inputs": {}, "teachers": {}, "shards": {}})

    def save(self, whole: bool = True) -> None:
        """Write the manifest whole (and drop the commit-log objects it now holds), or, with
        whole=False, append just the commits since the last save to the commit log: one small
        object, whatever the size of the store. Only commits go to the log; any other change to the
        manifest (inputs, teachers, forgotten shards) needs a whole save."""
        if not whole:
            if self.unsaved:
                self.log_seq += 1
                record = {"seq": self.log_seq, "commits": self.unsaved}
                fs.write_bytes_atomic(self._log_uri(self.log_seq), json.dumps(record).encode())
                self.unsaved = []
            return
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.manifest["log_seq"] = self.log_seq
        fs.write_bytes_atomic(fs.join(self.uri, MANIFEST), json.dumps(self.manifest, indent=1, sort_keys=True).encode())
        self.unsaved = []
        fs.remove_all([uri for seq, uri in self._log_objects() if seq <= self.log_seq])

    def _log_uri(self, seq: int) -> str:
        return fs.join(self.uri, COMMITS, f"{seq:08d}.json")

    def _log_objects(self) -> list[tuple[int, str]]:
        names = fs.file_sizes(fs.join(self.uri, COMMITS))  # one listing, fresh on object stores
        return sorted((int(n[:-5]), fs.join(self.uri, COMMITS, n)) for n in names
                      if n.endswith(".json") and n[:-5].isdigit())

    def _replay(self) -> None:
        """Apply the commit-log objects newer than the manifest, in order."""
        for seq, uri in self._log_objects():
            if seq <= self.log_seq:
                continue  # already in the manifest (a run that stopped before deleting it)
            try:
                record = json.loads(fs.read_bytes(uri))
            except ValueError:
                raise UserError(f"{uri}: a commit-log object that is not valid JSON; restore or delete it "
                                "(its shards are then relabelled)") from None
            for split, teacher, index, entry in record["commits"]:
                self.commit(split, teacher, int(index), entry)
            self.log_seq = seq
        self.unsaved = []

    # -- what is there -------------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        return self.manifest["num_classes"]

    def shard_uri(self, split: str, teacher: str, index: int) -> str:
        return fs.join(self.uri, split, teacher, shard_name(index))

    def inputs(self, split: str) -> list[dict[str, Any]]:
        return self.manifest["inputs"].get(split, [])

    def teacher(self, name: str) -> dict[str, Any]:
        if name not in self.manifest["teachers"]:
            raise UserError(f"{self.uri}: teacher '{name}' is not in the store (has {sorted(self.manifest['teachers'])}); run label")
        return self.manifest["teachers"][name]

    def entry(self, split: str, teacher: str, index: int) -> dict[str, Any] | None:
        return self.manifest["shards"].get(split, {}).get(teacher, {}).get(str(index))

    def missing(self, split: str, teacher: str) -> list[int]:
        return [i for i in range(len(self.inputs(split))) if self.entry(split, teacher, i) is None]

    def check_complete(self, split: str, teachers: list[str]) -> None:
        for t in teachers:
            self.teacher(t)
            if split not in self.manifest["inputs"]:
                raise UserError(f"{self.uri}: split '{split}' was never labelled; run 'ensemblekd label CONFIG'")
            gaps = self.missing(split, t)
            if gaps:
                raise UserError(f"{self.uri}: {len(gaps)} {split} shard(s) of teacher '{t}' are missing; re-run 'ensemblekd label CONFIG' to finish them")

    def check_sizes(self, split: str, teachers: list[str]) -> None:
        """Refuse a listed shard that is missing or has the wrong size: one listing per teacher, so
        a truncated file is caught in the driver; a flipped byte is caught by the checksum on read."""
        for t in teachers:
            sizes = fs.file_sizes(fs.join(self.uri, split, t))
            for key, entry in self.manifest["shards"].get(split, {}).get(t, {}).items():
                size = sizes.get(shard_name(int(key)))
                if size != entry["bytes"]:
                    found = "missing" if size is None else f"{size} bytes, the manifest says {entry['bytes']}"
                    raise UserError(f"{self.shard_uri(split, t, int(key))}: {found} (the shard is corrupt); "
                                    "run 'ensemblekd label CONFIG --repair'")

    def check_inputs(self, split: str, current: list[dict[str, Any]], key: str) -> None:
        """Refuse to train or evaluate on inputs that are not the ones labelled (same ids or not: the
        stored targets belong to the old rows); the fix is a label run, which relabels just those."""
        recorded = self.inputs(split)
        fix = "re-run 'ensemblekd label CONFIG' to relabel what changed"
        if len(recorded) != len(current):
            raise UserError(f"{key}: {len(current)} input file(s), the store labelled {len(recorded)}; {fix}")
        for old, new in zip(recorded, current):
            if not same_input(old, new):
                what = (f"{new['bytes']} bytes, labelled at {old['bytes']}" if old["bytes"] != new["bytes"] else
                        f"{new['rows']} rows, labelled at {old['rows']}" if old["rows"] != new["rows"] else
                        "its content differs")
                raise UserError(f"{key}: {new['uri']} changed since it was labelled ({what}); {fix}")

    # -- changing the manifest (driver only) ---------------------------------------------
    def set_inputs(self, split: str, shards: list[dict[str, Any]]) -> None:
        """Record a split's input shards; label shards of an input that changed are forgotten."""
        old = self.manifest["inputs"].get(split, [])
        for i, new in enumerate(shards):
            if i >= len(old) or not same_input(old[i], new):
                for per_teacher in self.manifest["shards"].get(split, {}).values():
                    per_teacher.pop(str(i), None)
        for per_teacher in self.manifest["shards"].get(split, {}).values():
            for key in [k for k in per_teacher if int(k) >= len(shards)]:
                del per_teacher[key]
        self.manifest["inputs"][split] = shards

    def set_teacher(self, name: str, fingerprint: str, spec: dict[str, Any]) -> bool:
        """Record a teacher; returns True (and forgets its shards) when its fingerprint changed."""
        old = self.manifest["teachers"].get(name)
        changed = old is not None and old["fingerprint"] != fingerprint
        if changed:
            for per_split in self.manifest["shards"].values():
                per_split.pop(name, None)
        if old is None or changed:
            self.manifest["teachers"][name] = {"fingerprint": fingerprint, "spec": spec}
        return changed

    def set_arrays(self, teacher: str, name: str, arrays: dict[str, np.ndarray] | None) -> None:
        """Keep arrays that a teacher's stored targets depend on beside its shards, as
        <name>/<teacher>.npz, the manifest holding its path, checksum and shapes (the feature PCA,
        the vocabulary map of a teacher with its own tokenizer). None: it has none."""
        if arrays is None:
            self.manifest["teachers"][teacher][name] = None
            return
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        path = f"{name}/{teacher}.npz"
        fs.write_bytes_atomic(fs.join(self.uri, path), buf.getvalue())
        self.manifest["teachers"][teacher][name] = {
            "path": path, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
            "shapes": {key: list(value.shape) for key, value in arrays.items()}}

    def arrays(self, teacher: str, name: str) -> dict[str, np.ndarray] | None:
        """What set_arrays kept, checksum verified; None if the teacher has none."""
        entry = self.teacher(teacher).get(name)
        if entry is None:
            return None
        uri = fs.join(self.uri, entry["path"])
        data = fs.read_bytes(uri)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise UserError(f"{uri}: checksum mismatch (the file is corrupt); relabel the teacher into a new store.uri")
        with np.load(io.BytesIO(data)) as found:
            return dict(found)

    def set_projection(self, teacher: str, pca: tuple[np.ndarray, np.ndarray] | None) -> None:
        """The PCA (mean, components) a teacher's stored features were reduced by (store.feature_dim),
        as projection/<teacher>.npz; None: the features are stored whole (no wider than feature_dim)."""
        self.set_arrays(teacher, "projection", None if pca is None else {"mean": pca[0], "components": pca[1]})

    def projection(self, teacher: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean [F], components [F, d]) of a teacher's feature PCA, or None if it has none."""
        found = self.arrays(teacher, "projection")
        return None if found is None else (found["mean"], found["components"])

    def feature_dims(self, teachers: list[str]) -> list[int]:
        """Each teacher's stored feature width, or a UserError for one that stores none."""
        dims = [self.teacher(t).get("feature_dim") for t in teachers]
        lacking = [t for t, d in zip(teachers, dims) if d is None]
        if lacking:
            raise UserError(f"{self.uri}: teachers {lacking} store no features; set their feature and re-run "
                            "'ensemblekd label CONFIG'")
        return cast("list[int]", dims)

    def class_count(self, teacher: str) -> int | None:
        """The classes (or vocabulary) of a teacher's stored targets; None before it has any."""
        entry = self.manifest["teachers"].get(teacher, {})
        has_shards = any(teacher in per_split for per_split in self.manifest["shards"].values())
        return entry.get("num_classes", self.manifest["num_classes"] if has_shards else None)

    def agree_classes(self, counts: dict[str, int], configured: list[str]) -> list[str]:
        """Settle the store's class count before anything is labelled. `counts`: what the teachers
        about to be labelled output (their actors ran them on a few rows). The configured teachers
        must agree, and the message names the one that differs; a teacher no longer configured
        whose stored targets hold another count is forgotten, so it never blocks the store.
        Returns the forgotten teachers."""
        known = {n: counts.get(n, self.class_count(n)) for n in configured}
        known = {n: c for n, c in known.items() if c is not None}
        tally = Counter(known.values()).most_common()
        if len(tally) > 1:
            common, votes = tally[0]
            if votes == tally[1][1]:
                raise UserError("the teachers disagree on the number of classes ("
                                + ", ".join(f"'{n}' {c}" for n, c in known.items())
                                + "); all teachers must share one label space")
            odd = [n for n, c in known.items() if c != common]
            others = ", ".join(n for n in known if n not in odd)
            raise UserError("; ".join(f"teacher '{n}' outputs {known[n]} classes" for n in odd)
                            + f", the other teachers ({others}) {common}; all teachers must share one label space: "
                            f"fix or remove {', '.join(repr(n) for n in odd)}")
        if not tally:
            return []
        count = tally[0][0]
        stale = [n for n in self.manifest["teachers"] if n not in configured and self.class_count(n) not in (None, count)]
        for name in stale:
            self.forget_teacher(name)
        self.manifest["num_classes"] = count
        return stale

    def forget_teacher(self, name: str) -> None:
        """Drop a teacher and its shards from the manifest (the files are overwritten if it returns)."""
        self.manifest["teachers"].pop(name, None)
        for per_split in self.manifest["shards"].values():
            per_split.pop(name, None)

    def set_dtype(self, dtype: str) -> None:
        """The store holds one dtype; a label run under another is refused."""
        if self.manifest["dtype"] is None:
            self.manifest["dtype"] = dtype
        elif self.manifest["dtype"] != dtype:
            raise UserError(f"store.dtype is {dtype} but the store at {self.uri} holds {self.manifest['dtype']}; keep the dtype or use a new store.uri")

    def set_task(self, task: str, info: dict[str, Any], implicit: dict[str, Any] | None = None) -> None:
        """Record the task and what its targets depend on (Task.store_info; token: vocabulary size,
        tokenizer hash, top-k, codec); a store labelled under other values is refused rather than
        mixed. `implicit`: what a store labelled before a key existed holds (Task.implicit_store_info)."""
        for key, value in {"task": task, **info}.items():
            stored = self.manifest.get(key, (implicit or {}).get(key))
            if stored not in (None, value) and self.manifest["shards"]:
                raise UserError(f"{self.uri}: labelled with {key} {stored}, the config gives {value}; "
                                "use a new store.uri (or the config the store was labelled with)")
            self.manifest[key] = value

    def check_task(self, task: str, info: dict[str, Any], implicit: dict[str, Any] | None = None) -> None:
        """Refuse to train from a store labelled under another task or vocabulary (see set_task)."""
        for key, value in {"task": task, **info}.items():
            stored = self.manifest.get(key, (implicit or {}).get(key))
            if stored != value:
                raise UserError(f"{self.uri}: labelled with {key} {stored}, the config gives {value}; "
                                "re-run label into a new store.uri")

    def set_val_accuracy(self, teacher: str, accuracy: float | None) -> None:
        self.teacher(teacher)["val_accuracy"] = accuracy

    def record_bytes_per(self, unit: str) -> None:
        """Keep bytes_per_<unit> in the manifest (Task.unit: row, or token)."""
        self.manifest[f"bytes_per_{unit}"] = self.bytes_per(unit)

    def bytes_per(self, unit: str) -> float | None:
        """Bytes of all label shards per stored unit (every teacher counted); None before any."""
        entries = [e for per_split in self.manifest["shards"].values() for per_t in per_split.values() for e in per_t.values()]
        count = sum(e.get(f"{unit}s", 0) for e in entries)
        return sum(e["bytes"] for e in entries) / count if count else None

    def forget_corrupt(self) -> list[tuple[str, str, int, str]]:
        """Drop every listed shard that fails verification (missing, wrong size, wrong checksum)
        from the manifest, so the next label run rewrites just those; returns what was dropped."""
        bad = [(split, teacher, index, why) for split, teacher, index, ok, why in self.verify() if not ok]
        for split, teacher, index, _ in bad:
            del self.manifest["shards"][split][teacher][str(index)]
        return bad

    def commit(self, split: str, teacher: str, index: int, entry: dict[str, Any]) -> None:
        self.unsaved.append([split, teacher, index, dict(entry)])
        num_classes = entry.pop("num_classes")
        self.set_dtype(entry.pop("dtype"))
        if self.manifest["num_classes"] not in (None, num_classes):  # agree_classes ran: only a teacher that changed
            raise UserError(f"teacher '{teacher}' outputs {num_classes} classes but the store holds "
                            f"{self.manifest['num_classes']}; all teachers must share one label space")
        self.manifest["num_classes"] = num_classes
        self.manifest["teachers"][teacher]["num_classes"] = num_classes
        if "feature_dim" in entry:
            self.manifest["teachers"][teacher]["feature_dim"] = entry.pop("feature_dim")
        entry["path"] = "/".join([split, teacher, shard_name(index)])
        self.manifest["shards"].setdefault(split, {}).setdefault(teacher, {})[str(index)] = entry

    # -- reading -------------------------------------------------------------------------
    def read_bytes(self, split: str, teacher: str, index: int, verify: bool = True) -> bytes:
        """The Parquet bytes of one committed shard; checksum-verified unless verify=False."""
        entry = self.entry(split, teacher, index)
        if entry is None:
            raise UserError(f"{self.uri}: {split} shard {index} of teacher '{teacher}' is not committed; run label")
        uri = self.shard_uri(split, teacher, index)
        data = fs.read_bytes(uri)
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise UserError(f"{uri}: checksum mismatch (the shard is corrupt); run 'ensemblekd label CONFIG --repair'")
        return data

    def read_table(self, split: str, teacher: str, index: int, verify: bool = True) -> pa.Table:
        """One committed shard as an Arrow table (the task's codec decodes it)."""
        return unpack(self.read_bytes(split, teacher, index, verify))

    # -- the public read API ---------------------------------------------------------------
    @property
    def task(self) -> str | None:
        return self.manifest.get("task")

    @property
    def teachers(self) -> list[str]:
        return sorted(self.manifest["teachers"])

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["inputs"])

    def val_accuracy(self, teachers: list[str]) -> dict[str, float | None]:
        """Each teacher's validation accuracy as label recorded it (None without labels)."""
        return {name: self.teacher(name).get("val_accuracy") for name in teachers}

    def table(self, teacher: str, split: str) -> pa.Table:
        """Every shard of a teacher for a split, checksum-verified, in input order: `id` and the
        task's target columns (classification: `logits`, one fixed-size list per row)."""
        self.check_complete(split, [teacher])
        return pa.concat_tables([self.read_table(split, teacher, i) for i in range(len(self.inputs(split)))])

    def verify(self) -> list[tuple[str, str, int, bool, str]]:
        """(split, teacher, index, ok, reason) for every listed shard."""
        out = []
        for split, per_split in sorted(self.manifest["shards"].items()):
            for teacher, entries in sorted(per_split.items()):
                for key, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
                    uri = self.shard_uri(split, teacher, int(key))
                    try:
                        data = fs.read_bytes(uri)
                    except FileNotFoundError:
                        out.append((split, teacher, int(key), False, "missing"))
                        continue
                    if len(data) != entry["bytes"]:
                        out.append((split, teacher, int(key), False, f"{len(data)} bytes, manifest says {entry['bytes']}"))
                    elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
                        out.append((split, teacher, int(key), False, "checksum mismatch"))
                    else:
                        out.append((split, teacher, int(key), True, "ok"))
        return out


class StoreView:
    """A store to read, as users get it (ekd.open_store): the read API of Store and nothing that
    writes (no commit, save, set_* or forget_*); `manifest` is a copy. `task` (the store's Task,
    given by the API) decodes targets and describes them."""

    def __init__(self, store: Store, task: Any = None):
        self._store = store
        self._task = task

    @property
    def uri(self) -> str:
        return self._store.uri

    @property
    def manifest(self) -> dict[str, Any]:
        return copy.deepcopy(self._store.manifest)

    @property
    def task(self) -> str | None:
        return self._store.task

    @property
    def teachers(self) -> list[str]:
        return self._store.teachers

    @property
    def splits(self) -> list[str]:
        return self._store.splits

    @property
    def num_classes(self) -> int | None:
        return self._store.num_classes

    def val_accuracy(self, teachers: list[str]) -> dict[str, float | None]:
        return self._store.val_accuracy(teachers)

    @property
    def unit(self) -> str:
        """What the targets count (Task.unit): row, or token."""
        return self._task.unit if self._task else "row"

    def bytes_per(self, unit: str) -> float | None:
        return self._store.bytes_per(unit)

    def describe(self) -> str:
        """The targets in a few words (Task.describe_store): classes and dtype, or vocabulary and top-k."""
        return self._task.describe_store(self._store.manifest) if self._task else "not labelled yet"

    def table(self, teacher: str, split: str) -> pa.Table:
        return self._store.table(teacher, split)

    def targets(self, teacher: str, split: str):
        """A teacher's decoded targets for a split, in input order, as its task's codec reads them
        (classification: ids, logits float32 [rows, classes], features; token: the top-k arrays)."""
        if self._task is None:
            raise UserError(f"{self.uri}: the store is not labelled yet; run label first")
        return self._task.decode(self._store.table(teacher, split))

    def verify(self) -> list[tuple[str, str, int, bool, str]]:
        return self._store.verify()


class StoreLock:
    """One writer per store: a label run holds STORE/label.lock while it fits its teachers and writes.

    The lock is created atomically (O_EXCL locally, a conditional PUT on object stores), names
    its holder (host, pid) and is refreshed by a heartbeat thread while it is held. A second run
    waits for it; a lock whose holder is gone (a dead pid on this host, or no refresh for
    LOCK_STALE_S) is taken over, so a killed run never blocks the store.
    """

    def __init__(self, store_uri: str):
        self.uri = fs.join(store_uri, LOCK)
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()

    def _content(self) -> bytes:
        return json.dumps({"host": self.host, "pid": self.pid, "token": self.token, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(fs.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except ValueError:  # a half-written lock from a crash: treat it as stale
            return {"host": "?", "pid": -1, "token": "?", "heartbeat": 0.0}

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if holder["host"] == self.host and holder["pid"] != self.pid:
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return time.time() - holder["heartbeat"] > LOCK_STALE_S

    def acquire(self, on_wait=None, poll_s: float = 0.5) -> None:
        """Block until this run holds the lock; on_wait(holder) is called once if it has to wait."""
        waited = False
        while not fs.create_exclusive(self.uri, self._content()):
            holder = self._holder()
            if holder is None:
                continue  # released between our attempt and our look
            if self._is_stale(holder):
                if self._holder() == holder:  # still the same dead holder: take its place
                    fs.remove(self.uri)
                continue
            if not waited and on_wait:
                on_wait(holder)
            waited = True
            time.sleep(poll_s)

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(LOCK_STALE_S / 8):
            try:
                fs.write_bytes_atomic(self.uri, self._content())
            except OSError:  # the store went read-only or full: the writer's own next write says so
                pass

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            fs.remove(self.uri)

    @contextmanager
    def held(self, on_wait=None) -> Iterator[StoreLock]:
        self.acquire(on_wait)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="store-lock-heartbeat", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            stop.set()
            beat.join()
            self.release()
