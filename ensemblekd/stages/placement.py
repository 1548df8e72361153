"""Which label actors host which teachers (the label stage's pools).

Several teachers in one actor label faster: each input shard is read and decoded once for all of
them, and there are fewer tasks to schedule (docs/configuration.md, "Placement"). So teachers
that set no `group` are placed together automatically when they can be:

- they run on CPU (num_gpus 0: a GPU teacher keeps its own actors and its GPU share),
- they ask for the same num_cpus and custom resources,
- every copy fits: actors × (their weights in memory, summed) stays within MEMORY_SHARE of the
  memory Ray has on the smallest node that could host them. Otherwise the largest teachers are
  packed first and the rest start another pool.

A pool made this way has the summed replicas of its teachers (as many actors as one pool per
teacher would ask for), but no more actors than the cluster has cores for: an actor runs
max(1, num_cpus) threads, and Ray's fractional CPUs would let 0.5-CPU actors outnumber the cores
(three 1-thread actors on 2 cores labelled 10-20% slower than two, tools/bench_speed.py). Teachers
with a `group` keep it (a group of one labels alone). All pools' actors together must fit the
cluster at once: an actor that cannot start would hold its queued shards forever, so check_fits
refuses such a layout in one line instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError

MEMORY_SHARE = 0.5  # of the smallest eligible node's Ray memory that all copies of a pool's teachers may take


@dataclass(frozen=True)
class Pool:
    members: tuple[int, ...]  # indices into cfg.teachers, in config order
    replicas: int
    automatic: bool = False

    def names(self, cfg: Config) -> list[str]:
        return [cfg.teachers[i].name for i in self.members]


@dataclass(frozen=True)
class Room:
    """What the cluster offers a pool of actors shaped like one teacher's."""
    memory: float  # bytes all copies of the pool's teachers may take (MEMORY_SHARE of the smallest eligible node)
    actors: int    # actors of that shape the cluster runs at once, one thread per core


def pools(cfg: Config, indices: list[int], memory_of: Callable[[TeacherConfig], int],
          room_of: Callable[[TeacherConfig], Room]) -> list[Pool]:
    """The pools for the teachers `indices` (those with shards to label); memory_of(t): the bytes
    teacher t holds in an actor."""
    explicit: dict[str, list[int]] = {}
    automatic: dict[tuple, list[int]] = {}
    for i in indices:
        t = cfg.teachers[i]
        if t.group is not None:
            explicit.setdefault(t.group, []).append(i)
        elif t.num_gpus > 0:
            explicit.setdefault(f"\0{t.name}", []).append(i)  # cannot clash with a group: names have no \0
        else:
            automatic.setdefault((t.num_cpus, tuple(sorted(t.resources.items()))), []).append(i)
    out = [Pool(tuple(members), cfg.teachers[members[0]].replicas) for members in explicit.values()]
    for members in automatic.values():
        out.extend(_pack(cfg, members, memory_of, room_of(cfg.teachers[members[0]])))
    return sorted(out, key=lambda p: p.members)


def _pack(cfg: Config, members: list[int], memory_of, room: Room) -> list[Pool]:
    """Largest first into as few pools as fit the room (a teacher too large for any still gets its
    own pool: placing it alone is what it would have had without automatic placement)."""
    memory = {i: memory_of(cfg.teachers[i]) for i in members}
    actors = lambda replicas: max(1, min(replicas, room.actors))  # noqa: E731
    packed: list[tuple[list[int], int, int]] = []  # (members, summed replicas, bytes per actor)
    for i in sorted(members, key=lambda m: -memory[m]):
        r = cfg.teachers[i].replicas
        for k, (group, replicas, per_actor) in enumerate(packed):
            if actors(replicas + r) * (per_actor + memory[i]) <= room.memory:
                packed[k] = (group + [i], replicas + r, per_actor + memory[i])
                break
        else:
            packed.append(([i], r, memory[i]))
    return [Pool(tuple(sorted(group)), actors(replicas) if len(group) > 1 else replicas, automatic=len(group) > 1)
            for group, replicas, _ in packed]


def asks(t: TeacherConfig) -> dict[str, float]:
    """The Ray resources one label actor of teacher t asks for (the positive ones)."""
    return {k: v for k, v in {"CPU": t.num_cpus, "GPU": t.num_gpus, **t.resources}.items() if v > 0}


def room_in_cluster(t: TeacherConfig) -> Room:
    """The Room of this Ray cluster for actors shaped like t's, from its alive nodes (no room when
    none has t's resources: the label stage then refuses the teacher in one line)."""
    import ray

    wanted = asks(t)
    nodes = [node["Resources"] for node in ray.nodes()
             if node["Alive"] and all(node["Resources"].get(k, 0.0) >= v for k, v in wanted.items())]
    if not nodes:
        return Room(0.0, 0)
    per_actor = {**wanted, "CPU": max(1.0, t.num_cpus)}  # the threads it runs, not Ray's fraction
    actors = sum(min(math.floor(n.get(k, 0.0) / v + 1e-9) for k, v in per_actor.items()) for n in nodes)
    return Room(MEMORY_SHARE * min(n.get("memory", 0.0) for n in nodes), actors)


def check_fits(cfg: Config, chosen: list[Pool], totals: dict[str, float]) -> None:
    """All pools' actors at once within the cluster's resources (`totals`: ray.cluster_resources()),
    else a one-line UserError."""
    need: dict[str, float] = {}
    for pool in chosen:
        for k, v in asks(cfg.teachers[pool.members[0]]).items():
            need[k] = need.get(k, 0.0) + pool.replicas * v
    for k, v in need.items():
        if v > totals.get(k, 0.0) + 1e-9:
            layout = ", ".join(f"{p.replicas} × {'+'.join(p.names(cfg))}" for p in chosen)
            raise UserError(f"teachers: their label actors ask for {v:g} {k} at once (actors: {layout}), but this "
                            f"Ray cluster has {totals.get(k, 0.0):g}; lower the teachers' replicas or "
                            "num_cpus/num_gpus/resources, or add nodes")
