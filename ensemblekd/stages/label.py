"""The label stage: Ray actor pools write the teachers' soft targets into the store, encoded by the
task (raw logits, or top-k log-probs for task token). An actor hosts several teachers when they fit
(stages.placement), or as `teachers.group` says.

The unit of work is (split, teacher, input shard). An actor reads the input shard once, runs its
teachers, and writes the label shard straight into the store (the data never passes through
the driver); the driver only commits the returned entry (rows, bytes, sha256) to the manifest,
which it saves at most about once a second (the new entries only, to the store's commit log: see
Store.save) and whole at the end. Shards already committed with the
same teacher fingerprint and the same input shard are skipped, so a re-run after a crash redoes
only what is missing. Actors restart on death and their in-flight shard is retried.

Each actor decodes the input shard itself. Sharing one decoded copy per shard between actors through
Ray's object store was measured slower on 2 cores (200k rows: 15.2 s against 13.6 s): the
reading task is one more process, and its copy into the object store costs about what it saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from ensemblekd.config import Config
from ensemblekd.data.inputs import input_shards
from ensemblekd.errors import UserError
from ensemblekd.features import PCA_ROWS, Projected, fit_pca
from ensemblekd.io import fs
from ensemblekd.io.ray_session import ensure_ray, require, unwrap
from ensemblekd.stages.fit import fit_teachers
from ensemblekd.stages.placement import Pool, check_fits, pools, room_in_cluster
from ensemblekd.store import Store, StoreLock
from ensemblekd.tasks import get_task
from ensemblekd.teachers import kind_of

SPLITS = ("train", "val", "test")
IN_FLIGHT_PER_ACTOR = 2  # one running, one queued: the actor never waits on the driver
PROBE_ROWS = 2


class TeacherWorker:
    """Hosts one teacher, or every teacher of a `teachers.group`: `label` reads an input shard once
    and writes one label shard for each hosted teacher that still needs it."""

    def __init__(self, cfg: Config, teacher_indices: list[int]):
        fs.configure_for(cfg)
        first = cfg.teachers[teacher_indices[0]]
        torch.set_num_threads(max(1, int(first.num_cpus)))
        self.cfg, self.task = cfg, get_task(cfg.task)
        self.device = "cuda" if first.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.hosted: dict[str, tuple[Any, Any, UserError | None]] = {}  # name -> (config, model, load error)
        # which node and process wrote a shard, kept in its manifest entry: on a cluster it shows
        # where the work ran, and that no step leaned on one node's local disk
        self.writer = {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                       "pid": os.getpid()}
        for i in teacher_indices:
            t = cfg.teachers[i]
            try:
                kind = kind_of(t)
                model = kind.load(cfg, t)
                if t.feature:
                    model = kind.with_features(cfg, t, model)
                self.hosted[t.name] = (t, model.to(self.device), None)
            except UserError as exc:  # raised from `label`, where the driver sees it as itself
                self.hosted[t.name] = (t, None, exc)

    def label(self, shard: dict[str, Any], jobs: list[tuple[str, str]], where: str,
              projections: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> list[dict[str, Any]]:
        """jobs: (teacher name, label shard URI); returns their manifest entries in that order.
        projections: the PCA of each teacher whose features are reduced (store.feature_dim), sent
        with every call so that a restarted actor applies it too."""
        inputs = self.task.read_inputs(self.cfg, shard)
        results = []
        for name, out_uri in jobs:
            data, entry = self._label(name, inputs, where, (projections or {}).get(name))
            fs.write_bytes_atomic(out_uri, data)
            results.append({**entry, "written_by": self.writer})
        return results

    def fit_projection(self, name: str, shards: list[dict[str, Any]], dim: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The PCA (features.fit_pca) of a hosted teacher's features over the first PCA_ROWS rows of
        `shards` (the train split); None when its features are no wider than `dim`."""
        t, model, error = self.hosted[name]
        if error:
            raise error
        parts, rows = [], 0
        for i, shard in enumerate(shards):
            where = f"train shard {i} ({shard['uri']})"
            part = self.task.features(model, self.task.read_inputs(self.cfg, shard), self.cfg, t, self.device, where)
            parts.append(part[:PCA_ROWS - rows])
            rows += len(parts[-1])
            if rows >= PCA_ROWS:
                break
        features = np.concatenate(parts)
        return None if features.shape[1] <= dim else fit_pca(features, dim)

    def probe(self, shard: dict[str, Any], names: list[str], where: str) -> dict[str, int]:
        """What each named teacher outputs (classes, or vocabulary) on the first rows of a shard, so
        the driver can check that the teachers agree before anything is written."""
        inputs = tuple(None if part is None else part[:PROBE_ROWS] for part in self.task.read_inputs(self.cfg, shard))
        return {name: self._label(name, inputs, where)[1]["num_classes"] for name in names}

    def _label(self, name: str, inputs, where: str, projection=None) -> tuple[bytes, dict[str, Any]]:
        t, model, error = self.hosted[name]
        if error:
            raise error
        if projection is not None:
            model = Projected(model, *projection).to(self.device)
        return self.task.label_shard(model, inputs, self.cfg, t, self.device, where)


def note(message: str) -> None:
    print(f"label: {message}", file=sys.stderr, flush=True)


def plan(cfg: Config, store: Store, splits=SPLITS) -> list[tuple[str, str, int]]:
    """Record inputs and fingerprints in the store; return the (split, teacher, index) still to do."""
    task = get_task(cfg.task)
    for split in splits:
        empty = lambda uri: note(f"skipping {uri}: it holds no rows (delete it to silence this note)")  # noqa: E731
        shards = input_shards(getattr(cfg.data, split), f"data.{split}", empty)
        task.check_inputs(cfg, shards, None)
        store.set_inputs(split, [s.signature() for s in shards])
    store.set_task(cfg.task, task.store_info(cfg), task.implicit_store_info)
    for t in cfg.teachers:
        store.set_teacher(t.name, *identity(cfg, t))
    task.keep_in_store(cfg, store)
    return [(split, t.name, i) for t in cfg.teachers for split in splits for i in store.missing(split, t.name)]


def identity(cfg: Config, t) -> tuple[str, dict[str, Any]]:
    """The fingerprint and spec the store keeps of a teacher: its kind's, and, for a teacher that
    stores features, which feature and at what width (a change relabels it)."""
    kind = kind_of(t)
    fingerprint, spec = kind.fingerprint(cfg, t), kind.spec(t)
    if t.feature:
        stored = {"feature": t.feature, "feature_dim": cfg.store.feature_dim}
        fingerprint = hashlib.sha256(json.dumps([fingerprint, stored]).encode()).hexdigest()[:16]
        spec = {**spec, **stored}
    return fingerprint, spec


def projections(cfg: Config, store: Store, todo: list[tuple[str, str, int]], actors: dict[Pool, list]) -> dict:
    """The PCA of each teacher to label whose features are reduced (store.feature_dim): the one the
    store keeps, or one fitted now on the train split by one of its actors and kept in the store
    before any of its shards is written. {name: (mean, components)}."""
    out: dict[str, tuple[np.ndarray, np.ndarray]]
    dim, out, fitting = cfg.store.feature_dim, {}, {}
    if not dim:
        return out
    labelling = {name for _, name, _ in todo}
    for pool, replicas in actors.items():
        for name in pool.names(cfg):
            t = next(x for x in cfg.teachers if x.name == name)
            if not t.feature or name not in labelling:
                continue
            if "projection" in store.teacher(name):  # fitted by an earlier run (None: stored whole)
                kept = store.projection(name)
                if kept is not None:
                    out[name] = kept
            elif "train" not in store.splits:
                raise UserError("store.feature_dim: the PCA of the teachers' features is fitted on the train split; "
                                "label train first (or with the other splits)")
            else:
                fitting[name] = replicas[0].fit_projection.remote(name, store.inputs("train"), dim)
    for name, ref in fitting.items():
        fitted = unwrap(ray.get, ref)
        store.set_projection(name, fitted)
        if fitted is None:
            note(f"teacher '{name}': its features are no wider than store.feature_dim ({dim}); they are stored whole")
        else:
            out[name] = fitted
    return out


def record_val_accuracy(cfg: Config, store: Store) -> None:
    """Each teacher's validation accuracy, from its stored targets, into the manifest."""
    task = get_task(cfg.task)
    for t in cfg.teachers:
        store.set_val_accuracy(t.name, task.stored_accuracy(cfg, store, "val", t.name))
    store.record_bytes_per(task.unit)


@dataclass(frozen=True)
class LabelResult:
    store: str                                  # the store's URI
    shards: int                                 # label shards written by this call (0: the store was complete)
    rows: int
    seconds: float
    fitted: list[dict[str, Any]] = field(default_factory=list)   # teachers fitted first: name, val_accuracy, seconds
    repaired: list[str] = field(default_factory=list)            # shards found corrupt and relabelled (repair=True)
    actors: list[dict[str, Any]] = field(default_factory=list)   # label actor pools: teachers, replicas (placement)


def label(cfg: Config, splits=SPLITS, progress: bool = True, repair: bool = False) -> LabelResult:
    """Fit the teachers that need it (stages.fit), then label every missing shard; returns counts
    and `fitted`. Saves the manifest as shards commit.

    repair=True first verifies every committed shard and relabels the ones that fail.
    One label run writes a store at a time (StoreLock), fit included: a second one waits, then
    finds the teachers fitted and the shards the first committed, and does only what is still
    missing (a teacher fitted twice at once would leave shards labelled by a checkpoint the
    other run then overwrote).
    """
    def waiting(holder: dict[str, Any]) -> None:
        print(f"label: {cfg.store.uri} is being written by pid {holder['pid']} on {holder['host']}; "
              "waiting for it to finish", file=sys.stderr, flush=True)

    with StoreLock(cfg.store.uri).held(on_wait=waiting):
        fitted = fit_teachers(cfg, progress)
        store = Store.open(cfg.store.uri, create=True)
        fs.remove_temporaries(cfg.store.uri, ("*.parquet", "*.json"))  # of a run killed mid-write: we are the writer now
        repaired = store.forget_corrupt() if repair else []
        todo = plan(cfg, store, splits)
        if todo:
            pools_run = run_pools(cfg, store, todo, progress)  # saves the plan once the teachers agree
        else:
            store.save()
            pools_run = {"shards": 0, "rows": 0, "seconds": 0.0, "actors": []}
        result = LabelResult(cfg.store.uri, fitted=fitted, repaired=[
            f"{split}/{teacher}/shard {index} ({why})" for split, teacher, index, why in repaired], **pools_run)
        if "val" in splits and (todo or None in store.val_accuracy([t.name for t in cfg.teachers]).values()):
            record_val_accuracy(cfg, store)
            store.save()
    return result


def agree(cfg: Config, store: Store, todo: list[tuple[str, str, int]], actors: dict[Pool, list]) -> None:
    """Before any shard is written: every teacher to label is run on a few rows of its first shard,
    and the store's label space is settled from what they output (Store.agree_classes)."""
    refs = []
    for pool, replicas in actors.items():
        names = pool.names(cfg)
        split, _, i = next(job for job in todo if job[1] in names)
        shard = store.inputs(split)[i]
        refs.append(replicas[0].probe.remote(shard, [n for n in names if any(job[1] == n for job in todo)],
                                             f"{split} shard {i} ({shard['uri']})"))
    counts = {name: count for ref in refs for name, count in unwrap(ray.get, ref).items()}
    for name in store.agree_classes(counts, [t.name for t in cfg.teachers]):
        note(f"forgot teacher '{name}' (no longer configured; its targets hold another number of classes)")


def start_actors(cfg: Config, todo: list[tuple[str, str, int]]) -> dict[Pool, list]:
    """The label actors of each pool (placement.pools: automatic unless the teachers set `group`),
    once every pool's actors can run at the same time (else one line: a pending actor would hold
    its queued shards forever)."""
    indices = [i for i, t in enumerate(cfg.teachers) if any(name == t.name for _, name, _ in todo)]
    chosen = pools(cfg, indices, lambda t: kind_of(t).memory_bytes(cfg, t), room_in_cluster)
    for pool in chosen:
        t = cfg.teachers[pool.members[0]]  # a pool's members share num_cpus/num_gpus/resources (config, placement)
        who = ", ".join(f"'{name}'" for name in pool.names(cfg))
        require(f"teacher{'s' if len(pool.members) > 1 else ''} {who} (num_cpus/num_gpus/resources)",
                t.num_cpus, t.num_gpus, t.resources)
    check_fits(cfg, chosen, ray.cluster_resources())
    actor_cls = ray.remote(TeacherWorker)
    actors: dict[Pool, list] = {}
    for pool in chosen:
        t = cfg.teachers[pool.members[0]]
        opts = dict(num_cpus=t.num_cpus, num_gpus=t.num_gpus, resources=t.resources, max_restarts=-1, max_task_retries=3)
        actors[pool] = [actor_cls.options(**opts).remote(cfg, list(pool.members)) for _ in range(pool.replicas)]
    return actors


def run_pools(cfg: Config, store: Store, todo: list[tuple[str, str, int]], progress: bool) -> dict[str, Any]:
    """The teachers' actor pools (start_actors), each actor kept busy with IN_FLIGHT_PER_ACTOR shards;
    a pool's teachers share each of its actors and each read of an input shard."""
    from tqdm import tqdm

    ensure_ray(cfg.ray, cfg.node_paths())
    start = time.perf_counter()
    missing = set(todo)
    actors = start_actors(cfg, todo)
    queues = {pool: deque(dict.fromkeys((split, i) for split, name, i in todo if name in pool.names(cfg)))
              for pool in actors}

    in_flight: dict[Any, tuple[str, int, list[str], Pool, Any]] = {}
    projection_ref = None  # ray.put of projections(): each teacher's PCA, when store.feature_dim reduces its features

    def submit(pool: Pool, actor) -> None:
        if not queues[pool]:
            return
        split, i = queues[pool].popleft()
        names = [name for name in pool.names(cfg) if (split, name, i) in missing]
        shard = store.inputs(split)[i]
        jobs = [(name, store.shard_uri(split, name, i)) for name in names]
        ref = actor.label.remote(shard, jobs, f"{split} shard {i} ({shard['uri']})", projection_ref)
        in_flight[ref] = (split, i, names, pool, actor)

    rows, units, last_save, agreed = 0, 0, time.monotonic(), False
    truncated: dict[str, int] = {}  # inputs a teacher cut to its length limit (task text), said once at the end
    unit = get_task(cfg.task).unit
    try:
        agree(cfg, store, todo, actors)
        projection_ref = ray.put(projections(cfg, store, todo, actors))
        store.save()  # the plan (shards of changed inputs or teachers forgotten) before any shard is rewritten
        agreed = True
        for pool, replicas in actors.items():
            for _ in range(IN_FLIGHT_PER_ACTOR):
                for actor in replicas:
                    submit(pool, actor)
        with tqdm(total=len(todo), desc="label", unit="shard", disable=not progress) as bar:
            while in_flight:
                done, _ = ray.wait(list(in_flight), num_returns=1)
                split, i, names, pool, actor = in_flight.pop(done[0])
                for name, entry in zip(names, unwrap(ray.get, done[0])):
                    store.commit(split, name, i, entry)
                    rows += entry["rows"]
                    units += entry.get(f"{unit}s", 0)  # the task's unit of work (task token: tokens)
                    truncated[name] = truncated.get(name, 0) + entry.get("truncated", 0)
                submit(pool, actor)
                bar.update(len(names))
                bar.set_postfix_str(f"{units / (time.perf_counter() - start):,.0f} {unit}s/s")
                if time.monotonic() - last_save > 1.0:
                    store.save(whole=False)  # the new commits only: one small object (Store.save)
                    last_save = time.monotonic()
        for name, count in truncated.items():
            if count:
                note(f"teacher '{name}': {count} of the inputs it labelled were longer than its length limit and were "
                     "cut to it")
    finally:
        if agreed:
            store.save()  # whatever committed is kept, also on error or Ctrl-C
        for replicas in actors.values():
            for actor in replicas:
                ray.kill(actor)
    return {"shards": len(todo), "rows": rows, "seconds": time.perf_counter() - start,
            "actors": [{"teachers": pool.names(cfg), "replicas": pool.replicas} for pool in actors]}
