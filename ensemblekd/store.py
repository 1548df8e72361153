"""The soft-target store: the contract between labelling and distillation.

Layout on any fsspec URI:

    STORE/manifest.json
    STORE/<split>/<teacher>/part-NNNNN.parquet    columns: id int64, logits fixed_size_list<fp16|fp32>[C]
                                                  (task token: top-k log-probs, ids and tail mass per
                                                  position; see ensemblekd.tokens)

Shard NNNNN of a teacher is row-aligned with input shard NNNNN of the split and carries the
input `id`, so alignment can be checked. Raw logits are stored (temperature is a training
choice). A shard file appears whole (write-then-rename; a single PUT on object stores) and is
only trusted once the manifest lists it with its rows, bytes and sha256; the manifest is written
by the driver alone, after the shards it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

from ensemblekd import storage
from ensemblekd.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "label.lock"
LOCK_STALE_S = 120.0  # a holder on another host that has not refreshed its lock for this long is gone


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def encode_shard(ids: np.ndarray, logits: np.ndarray, dtype: str) -> tuple[bytes, dict[str, Any]]:
    """Parquet bytes of one label shard and its manifest entry (rows, bytes, sha256)."""
    c = logits.shape[1]
    arrow_type = pa.float16() if dtype == "float16" else pa.float32()
    values = pa.array(logits.astype(np.dtype(dtype), copy=False).reshape(-1), type=arrow_type)
    table = pa.table({"id": pa.array(ids, pa.int64()), "logits": pa.FixedSizeListArray.from_arrays(values, c)})
    data = storage.table_to_parquet_bytes(table)
    return data, {"rows": len(ids), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def decode_shard(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    col = table["logits"].combine_chunks()
    width = col.type.list_size
    logits = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
    return table["id"].to_numpy().astype(np.int64), logits


class Store:
    """The manifest in memory plus the shard I/O around it. Only the driver calls `save`."""

    def __init__(self, uri: str, manifest: dict[str, Any]):
        self.uri = uri
        self.m = manifest
        self.lock: StoreLock | None = None  # held by the label run that writes this store

    # -- opening and saving -------------------------------------------------------------
    @classmethod
    def open(cls, uri: str, create: bool = False) -> Store:
        path = storage.join(uri, MANIFEST)
        if storage.exists(path):
            try:
                manifest = json.loads(storage.read_bytes(path))
            except ValueError:
                raise UserError(f"{path}: the manifest is not valid JSON; delete the store or restore the file") from None
            version = manifest.get("schema_version")
            if version != SCHEMA_VERSION:
                raise UserError(f"{uri}: store schema version {version}, this ensemblekd reads {SCHEMA_VERSION}; relabel into a new store.uri")
            return cls(uri, manifest)
        if not create:
            raise UserError(f"no soft-target store at '{uri}' (no {MANIFEST}); run 'ensemblekd label CONFIG' first")
        return cls(uri, {"schema_version": SCHEMA_VERSION, "task": "classification", "num_classes": None,
                         "dtype": None, "inputs": {}, "teachers": {}, "shards": {}})

    def save(self) -> None:
        if self.lock:
            self.lock.refresh()
        self.m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        storage.write_bytes_atomic(storage.join(self.uri, MANIFEST), json.dumps(self.m, indent=1, sort_keys=True).encode())

    # -- what is there -------------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        return self.m["num_classes"]

    def shard_uri(self, split: str, teacher: str, index: int) -> str:
        return storage.join(self.uri, split, teacher, shard_name(index))

    def inputs(self, split: str) -> list[dict[str, Any]]:
        return self.m["inputs"].get(split, [])

    def teacher(self, name: str) -> dict[str, Any]:
        if name not in self.m["teachers"]:
            raise UserError(f"{self.uri}: teacher '{name}' is not in the store (has {sorted(self.m['teachers'])}); run label")
        return self.m["teachers"][name]

    def entry(self, split: str, teacher: str, index: int) -> dict[str, Any] | None:
        return self.m["shards"].get(split, {}).get(teacher, {}).get(str(index))

    def missing(self, split: str, teacher: str) -> list[int]:
        return [i for i in range(len(self.inputs(split))) if self.entry(split, teacher, i) is None]

    def check_complete(self, split: str, teachers: list[str]) -> None:
        for t in teachers:
            self.teacher(t)
            if split not in self.m["inputs"]:
                raise UserError(f"{self.uri}: split '{split}' was never labelled; run 'ensemblekd label CONFIG'")
            gaps = self.missing(split, t)
            if gaps:
                raise UserError(f"{self.uri}: {len(gaps)} {split} shard(s) of teacher '{t}' are missing; re-run 'ensemblekd label CONFIG' to finish them")

    def check_sizes(self, split: str, teachers: list[str]) -> None:
        """Refuse a listed shard that is missing or has the wrong size: one listing per teacher, so
        a truncated file is caught in the driver; a flipped byte is caught by the checksum on read."""
        for t in teachers:
            sizes = storage.file_sizes(storage.join(self.uri, split, t))
            for key, entry in self.m["shards"].get(split, {}).get(t, {}).items():
                size = sizes.get(shard_name(int(key)))
                if size != entry["bytes"]:
                    found = "missing" if size is None else f"{size} bytes, the manifest says {entry['bytes']}"
                    raise UserError(f"{self.shard_uri(split, t, int(key))}: {found} (the shard is corrupt); "
                                    "run 'ensemblekd label CONFIG --repair'")

    # -- changing the manifest (driver only) ---------------------------------------------
    def set_inputs(self, split: str, shards: list[dict[str, Any]]) -> None:
        """Record a split's input shards; label shards of an input that changed are forgotten."""
        old = self.m["inputs"].get(split, [])
        for i, new in enumerate(shards):
            if i >= len(old) or old[i] != new:
                for per_teacher in self.m["shards"].get(split, {}).values():
                    per_teacher.pop(str(i), None)
        for per_teacher in self.m["shards"].get(split, {}).values():
            for key in [k for k in per_teacher if int(k) >= len(shards)]:
                del per_teacher[key]
        self.m["inputs"][split] = shards

    def set_teacher(self, name: str, fingerprint: str, spec: dict[str, Any]) -> bool:
        """Record a teacher; returns True (and forgets its shards) when its fingerprint changed."""
        old = self.m["teachers"].get(name)
        changed = old is not None and old["fingerprint"] != fingerprint
        if changed:
            for per_split in self.m["shards"].values():
                per_split.pop(name, None)
        if old is None or changed:
            self.m["teachers"][name] = {"fingerprint": fingerprint, "spec": spec}
        return changed

    def set_format(self, num_classes: int, dtype: str, teacher: str) -> None:
        """The store holds one class count and one dtype; a teacher that disagrees is refused."""
        if self.m["num_classes"] is None:
            self.m["num_classes"] = num_classes
        elif self.m["num_classes"] != num_classes:
            raise UserError(f"teacher '{teacher}' outputs {num_classes} classes but the store holds {self.m['num_classes']}; "
                            "all teachers must share one label space (or use a new store.uri)")
        if self.m["dtype"] is None:
            self.m["dtype"] = dtype
        elif self.m["dtype"] != dtype:
            raise UserError(f"store.dtype is {dtype} but the store at {self.uri} holds {self.m['dtype']}; keep the dtype or use a new store.uri")

    def set_vocabulary(self, info: dict[str, Any]) -> None:
        """task token: record the vocabulary (size, tokenizer hash) and top-k; a store labelled
        with another one is refused rather than mixed."""
        self.m["task"] = "token"
        for key, value in info.items():
            if self.m.get(key) not in (None, value) and self.m["shards"]:
                raise UserError(f"{self.uri}: labelled with {key} {self.m[key]}, the config gives {value} (another "
                                "tokenizer or top_k); use a new store.uri")
            self.m[key] = value

    def bytes_per_token(self) -> float | None:
        """task token: bytes of all label shards per stored token (every teacher counted)."""
        entries = [e for per_split in self.m["shards"].values() for per_t in per_split.values() for e in per_t.values()]
        tokens = sum(e.get("tokens", 0) for e in entries)
        return sum(e["bytes"] for e in entries) / tokens if tokens else None

    def forget_corrupt(self) -> list[tuple[str, str, int, str]]:
        """Drop every listed shard that fails verification (missing, wrong size, wrong checksum)
        from the manifest, so the next label run rewrites just those; returns what was dropped."""
        bad = [(split, teacher, index, why) for split, teacher, index, ok, why in self.verify() if not ok]
        for split, teacher, index, _ in bad:
            del self.m["shards"][split][teacher][str(index)]
        return bad

    def commit(self, split: str, teacher: str, index: int, entry: dict[str, Any]) -> None:
        self.set_format(entry.pop("num_classes"), entry.pop("dtype"), teacher)
        entry["path"] = "/".join([split, teacher, shard_name(index)])
        self.m["shards"].setdefault(split, {}).setdefault(teacher, {})[str(index)] = entry

    # -- reading -------------------------------------------------------------------------
    def read_bytes(self, split: str, teacher: str, index: int, verify: bool = True) -> bytes:
        """The Parquet bytes of one committed shard; checksum-verified unless verify=False."""
        entry = self.entry(split, teacher, index)
        if entry is None:
            raise UserError(f"{self.uri}: {split} shard {index} of teacher '{teacher}' is not committed; run label")
        uri = self.shard_uri(split, teacher, index)
        data = storage.read_bytes(uri)
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise UserError(f"{uri}: checksum mismatch (the shard is corrupt); run 'ensemblekd label CONFIG --repair'")
        return data

    def read(self, split: str, teacher: str, index: int, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logits) of one committed classification shard."""
        return decode_shard(self.read_bytes(split, teacher, index, verify))

    def read_split(self, split: str, teacher: str, ids: np.ndarray) -> np.ndarray:
        """A teacher's float32 logits for a whole (small) split, checked against the input ids."""
        parts = [self.read(split, teacher, i) for i in range(len(self.inputs(split)))]
        if not np.array_equal(np.concatenate([p[0] for p in parts]), ids):
            raise UserError(f"{self.uri}: {split} logits of '{teacher}' are not aligned with the data; re-run label")
        return np.concatenate([p[1] for p in parts]).astype(np.float32)

    def verify(self) -> list[tuple[str, str, int, bool, str]]:
        """(split, teacher, index, ok, reason) for every listed shard."""
        out = []
        for split, per_split in sorted(self.m["shards"].items()):
            for teacher, entries in sorted(per_split.items()):
                for key, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
                    uri = self.shard_uri(split, teacher, int(key))
                    try:
                        data = storage.read_bytes(uri)
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


class StoreLock:
    """One writer per store: a label run holds STORE/label.lock while it writes.

    The lock is created atomically (O_EXCL locally, a conditional PUT on object stores), names
    its holder (host, pid) and is refreshed whenever the manifest is saved. A second run waits
    for it; a lock whose holder is gone (a dead pid on this host, or no refresh for
    LOCK_STALE_S) is taken over, so a killed run never blocks the store.
    """

    def __init__(self, store_uri: str):
        self.uri = storage.join(store_uri, LOCK)
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.last_refresh = 0.0

    def _content(self) -> bytes:
        return json.dumps({"host": self.host, "pid": self.pid, "token": self.token, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.uri))
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
        while not storage.create_exclusive(self.uri, self._content()):
            holder = self._holder()
            if holder is None:
                continue  # released between our attempt and our look
            if self._is_stale(holder):
                if self._holder() == holder:  # still the same dead holder: take its place
                    storage.remove(self.uri)
                continue
            if not waited and on_wait:
                on_wait(holder)
            waited = True
            time.sleep(poll_s)
        self.last_refresh = time.monotonic()

    def refresh(self) -> None:
        if time.monotonic() - self.last_refresh > 1.0:
            storage.write_bytes_atomic(self.uri, self._content())
            self.last_refresh = time.monotonic()

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            storage.remove(self.uri)

    @contextmanager
    def held(self, on_wait=None) -> Iterator[StoreLock]:
        self.acquire(on_wait)
        try:
            yield self
        finally:
            self.release()
