"""Automatic label placement: which teachers share actors, with how many replicas."""

import pytest

from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.stages.placement import Pool, Room, check_fits, pools

MB = 1 << 20


def _config(*teachers: dict) -> Config:
    return Config.model_validate({
        "data": {"train": "tr", "val": "va", "test": "te"},
        "teachers": [{"name": f"t{i}", "model": "m:f", "checkpoint": f"t{i}.pt", **t} for i, t in enumerate(teachers)],
        "store": {"uri": "store"},
        "student": {"model": "m:f"},
    })


def _pools(cfg: Config, sizes_mb: list[float], budget_mb: float = 1024, actors: int = 100) -> list[Pool]:
    sizes = {t.name: s * MB for t, s in zip(cfg.teachers, sizes_mb)}
    return pools(cfg, list(range(len(cfg.teachers))), lambda t: sizes[t.name], lambda t: Room(budget_mb * MB, actors))


def test_cpu_teachers_with_the_same_resources_share_every_actor_with_replicas_summed():
    cfg = _config({}, {"replicas": 2}, {})
    assert _pools(cfg, [1, 1, 1]) == [Pool((0, 1, 2), 4, automatic=True)]


def test_gpu_teachers_different_resources_and_explicit_groups_keep_their_own_pools():
    cfg = _config({}, {"num_gpus": 0.5, "replicas": 2}, {"num_cpus": 1}, {"resources": {"tag": 1}},
                  {"group": "g", "replicas": 3}, {"group": "g", "replicas": 3}, {"group": "t6"}, {})
    assert _pools(cfg, [1] * 8) == [
        Pool((0, 7), 2, automatic=True),  # the only two alike: CPU, 0.5 CPU, no custom resources, no group
        Pool((1,), 2), Pool((2,), 1), Pool((3,), 1),
        Pool((4, 5), 3),                  # an explicit group keeps its replicas
        Pool((6,), 1),                    # a group of one: labels alone
    ]


def test_teachers_that_do_not_fit_together_are_packed_largest_first():
    cfg = _config({}, {}, {}, {})
    # budget 100 MB for all copies, replicas x bytes per actor: t2 (60) first; t1 (40) with it would
    # be 2 x 100; t0 (10) joins t1 (2 x 50); t3 (5) fits neither (2 x 65, 3 x 55)
    assert _pools(cfg, [10, 40, 60, 5], budget_mb=100) == [
        Pool((0, 1), 2, automatic=True), Pool((2,), 1), Pool((3,), 1)]
    assert _pools(cfg, [10, 40, 60, 5], budget_mb=0) == [Pool((i,), 1) for i in range(4)]


def test_only_the_teachers_asked_for_are_placed():
    cfg = _config({}, {}, {})
    assert pools(cfg, [0, 2], lambda t: MB, lambda t: Room(1024 * MB, 100)) == [Pool((0, 2), 2, automatic=True)]


def test_a_shared_pool_has_no_more_actors_than_the_cluster_has_cores_for():
    cfg = _config(*[{}] * 8)  # one pool per teacher: 8 actors of 0.5 CPU, 1 thread each; a 2-core Ray runs 2
    assert _pools(cfg, [1] * 8, actors=2) == [Pool(tuple(range(8)), 2, automatic=True)]
    # fewer copies also fit more teachers together: 2 x 6 MB <= 13 MB; uncapped, 6 x 6 MB would not
    assert _pools(cfg, [1] * 6 + [100, 100], budget_mb=13, actors=2)[0] == Pool(tuple(range(6)), 2, automatic=True)


def test_actors_that_cannot_all_run_at_once_are_refused_in_one_line():
    cfg = _config({"group": "g", "replicas": 3}, {"group": "g", "replicas": 3}, {"num_gpus": 1})
    chosen = [Pool((0, 1), 3), Pool((2,), 1)]
    check_fits(cfg, chosen, {"CPU": 2.0, "GPU": 1.0})  # 2 CPU (3 + 1 actors x 0.5), 1 GPU: fits
    with pytest.raises(UserError, match=r"^teachers: their label actors ask for 2 CPU at once \(actors: 3 × t0\+t1, "
                                        r"1 × t2\), but this Ray cluster has 1.5; lower the teachers' replicas or "
                                        r"num_cpus/num_gpus/resources, or add nodes$"):
        check_fits(cfg, chosen, {"CPU": 1.5, "GPU": 1.0})
