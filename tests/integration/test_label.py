"""The label stage on real Ray actors: resume, skip, relabel on a new fingerprint, refuse bad teachers."""

import os
import socket

import numpy as np
import psutil
import pytest
import torch

import ensemblekd as ekd
from ensemblekd import UserError
from ensemblekd.store import Store
from ensemblekd.tasks import classification
from ensemblekd.testing import build_module, save_state, tiny_config, write_config


def _mtimes(root):
    return {p: os.stat(p).st_mtime_ns for p in sorted(map(str, root.rglob("*.parquet")))}


def test_store_is_complete_aligned_and_has_val_accuracy(labelled):
    cfg, result = labelled
    store = Store.open(cfg.store.uri)
    n_inputs = sum(len(store.inputs(s)) for s in ("train", "val", "test"))
    assert result.shards == n_inputs * 2 and result.rows == 1797 * 2
    for split in ("train", "val", "test"):
        store.check_complete(split, ["mlp_a", "mlp_b"])
    assert store.num_classes == 10 and store.manifest["dtype"] == "float16"
    assert all(ok for *_, ok, _ in store.verify())
    for name in ("mlp_a", "mlp_b"):
        assert store.teacher(name)["val_accuracy"] > 0.85
        ids, logits, _ = classification.decode(store.read_table("train", name, 0))
        assert logits.shape == (len(ids), 10) and logits.dtype == np.float16
    # every entry names the node and process that wrote it: a label actor on this (only) node
    import ray

    writers = {(e["written_by"]["node_id"], e["written_by"]["host"], e["written_by"]["pid"]) for per_split in store.manifest["shards"].values()
               for per_teacher in per_split.values() for e in per_teacher.values()}
    assert {(node, host) for node, host, _ in writers} == {(ray.get_runtime_context().get_node_id(),
                                                            socket.gethostname())}
    assert all(pid != os.getpid() for *_, pid in writers)


def test_resume_redoes_only_missing_shards(tmp_path, digits_dir, ray_local):
    cfg = ekd.load_config(write_config(tmp_path, tiny_config(tmp_path, digits_dir)))
    ekd.label(cfg, progress=False)
    store_dir = tmp_path / "store"
    before = _mtimes(store_dir)

    again = ekd.label(cfg, progress=False)
    assert again.shards == 0 and _mtimes(store_dir) == before  # complete store: no teacher work

    # an interrupted run: two shards never committed (one file written, one not)
    store = Store.open(cfg.store.uri)
    del store.manifest["shards"]["train"]["mlp_a"]["1"]
    del store.manifest["shards"]["test"]["mlp_b"]["0"]
    store.save()
    os.remove(store.shard_uri("test", "mlp_b", 0))
    resumed = ekd.label(cfg, progress=False)
    assert resumed.shards == 2
    after = _mtimes(store_dir)
    redone = {p for p in after if before.get(p) != after[p]}
    assert redone == {store.shard_uri("train", "mlp_a", 1), store.shard_uri("test", "mlp_b", 0)}
    assert all(ok for *_, ok, _ in ekd.open_store(cfg.store.uri).verify())


def test_changed_teacher_is_relabelled_alone(tmp_path, digits_dir, ray_local):
    cfg = ekd.load_config(write_config(tmp_path, tiny_config(tmp_path, digits_dir)))
    ekd.label(cfg, progress=False)
    before = _mtimes(tmp_path / "store")
    refit = ekd.load_config(tmp_path / "config.yaml", ["teachers.1.fit.seed=7"])  # new weights for mlp_b
    result = ekd.label(refit, progress=False)
    assert [f["name"] for f in result.fitted] == ["mlp_b"]
    after = _mtimes(tmp_path / "store")
    changed = {p for p in after if before[p] != after[p]}
    assert changed and all("/mlp_b/" in p for p in changed)
    assert len(changed) == sum(1 for p in after if "/mlp_b/" in p)


def test_teachers_disagreeing_on_classes_are_refused(tmp_path, digits_dir, ray_local):
    cfg = tiny_config(tmp_path, digits_dir)
    cfg["teachers"][1]["kwargs"]["num_classes"] = 12
    with pytest.raises(UserError, match="classes"):
        ekd.label(ekd.load_config(write_config(tmp_path, cfg)), progress=False)


def test_nan_logits_are_refused_naming_teacher_and_shard(tmp_path, digits_dir, ray_local):
    cfg = tiny_config(tmp_path, digits_dir)
    bad = {"name": "nan_teacher", "model": "faulty_models:nan_mlp",
           "kwargs": {"in_features": 64, "num_classes": 10, "hidden": [8]},
           "checkpoint": str(tmp_path / "nan.pt"), "num_cpus": 0.5}
    save_state(build_module(bad["model"], bad["kwargs"]), bad["checkpoint"])
    cfg["teachers"] = [bad]
    with pytest.raises(UserError, match=r"teacher 'nan_teacher' produced NaN/Inf logits on \w+ shard \d+"):
        ekd.label(ekd.load_config(write_config(tmp_path, cfg)), progress=False)


def test_checkpoint_that_does_not_match_the_model(tmp_path, digits_dir, ray_local):
    cfg = tiny_config(tmp_path, digits_dir)
    wrong = tmp_path / "wrong.pt"
    save_state(build_module("ensemblekd.models:mlp", {"in_features": 64, "num_classes": 10, "hidden": [5]}), str(wrong))
    cfg["teachers"] = [{**cfg["teachers"][0], "checkpoint": str(wrong)}]
    del cfg["teachers"][0]["fit"]
    with pytest.raises(UserError, match="does not match the model"):
        ekd.label(ekd.load_config(write_config(tmp_path, cfg)), progress=False)


def test_repair_rewrites_just_the_corrupt_shard(tmp_path, digits_dir, ray_local):
    cfg = ekd.load_config(write_config(tmp_path, tiny_config(tmp_path, digits_dir)))
    ekd.label(cfg, progress=False)
    store = Store.open(cfg.store.uri)
    corrupt = store.shard_uri("val", "mlp_b", 1)
    raw = bytearray(open(corrupt, "rb").read())
    raw[100] ^= 0xFF
    open(corrupt, "wb").write(bytes(raw))
    with pytest.raises(UserError, match="checksum mismatch.*--repair"):
        classification.decode(store.read_table("val", "mlp_b", 1))
    before = _mtimes(tmp_path / "store")

    plain = ekd.label(cfg, progress=False)           # a plain re-run trusts the manifest: nothing to do
    assert plain.shards == 0 and plain.repaired == []
    repaired = ekd.label(cfg, progress=False, repair=True)
    assert repaired.shards == 1 and repaired.repaired == ["val/mlp_b/shard 1 (checksum mismatch)"]
    after = _mtimes(tmp_path / "store")
    assert {p for p in after if after[p] != before[p]} == {corrupt}
    assert all(ok for *_, ok, _ in ekd.open_store(cfg.store.uri).verify())


def test_resources_no_node_has_are_refused_instead_of_hanging(tmp_path, digits_dir, ray_local):
    cfg = tiny_config(tmp_path, digits_dir)
    cfg["teachers"][1]["num_gpus"] = 1                 # no GPU on this machine's Ray
    loaded = ekd.load_config(write_config(tmp_path, cfg))
    ekd.label(loaded.model_copy(update={"teachers": loaded.teachers[:1]}), progress=False)
    with pytest.raises(UserError, match=r"teacher 'mlp_b' \(num_cpus/num_gpus/resources\): asks for 0.5 CPU and 1 GPU"):
        ekd.label(loaded, progress=False)
    assert Store.open(loaded.store.uri).missing("train", "mlp_a") == []   # nothing already written is lost


def _writers(store: Store, name: str) -> dict[tuple[str, str], int]:
    return {(split, index): e["written_by"]["pid"] for split, per in store.manifest["shards"].items()
            for index, e in per[name].items()}


def test_automatic_placement_and_one_pool_per_teacher_write_the_same_store(tmp_path, digits_dir, ray_local, labelled):
    """By default both CPU teachers share every actor (replicas summed: 2 actors, one read of each input
    shard); `group` set to each teacher's own name gives one pool per teacher. The shards are byte for
    byte the same, and a resume redoes only what is missing."""
    auto_cfg, auto = labelled
    assert auto.actors == [{"teachers": ["mlp_a", "mlp_b"], "replicas": 2}]
    shared = Store.open(auto_cfg.store.uri)
    assert _writers(shared, "mlp_a") == _writers(shared, "mlp_b")  # each input shard: one process, both teachers
    assert len(set(_writers(shared, "mlp_a").values())) == 2

    raw = tiny_config(tmp_path, digits_dir)
    for t, ref in zip(raw["teachers"], auto_cfg.teachers):
        t.update(group=t["name"], checkpoint=ref.checkpoint)
        t.pop("fit", None)
    cfg = ekd.load_config(write_config(tmp_path, raw))
    result = ekd.label(cfg, progress=False)
    assert result.actors == [{"teachers": ["mlp_a"], "replicas": 1}, {"teachers": ["mlp_b"], "replicas": 1}]
    store = Store.open(cfg.store.uri)
    assert result.shards == sum(len(store.inputs(s)) for s in ("train", "val", "test")) * 2
    a, b = _writers(store, "mlp_a"), _writers(store, "mlp_b")
    assert len(set(a.values())) == len(set(b.values())) == 1 and set(a.values()) != set(b.values())
    for split, teachers in shared.manifest["shards"].items():
        for name, entries in teachers.items():
            assert {k: e["sha256"] for k, e in entries.items()} == \
                   {k: e["sha256"] for k, e in store.manifest["shards"][split][name].items()}
    del store.manifest["shards"]["train"]["mlp_b"]["1"]
    store.save()
    assert ekd.label(cfg, progress=False).shards == 1


def test_the_room_for_shared_actors_is_one_per_core_of_the_local_ray(labelled):
    from ensemblekd.stages.placement import room_in_cluster

    t = labelled[0].teachers[0]
    room = room_in_cluster(t)  # 2 CPUs: four 0.5-CPU actors would fit Ray, two 1-thread actors fit the cores
    assert room.actors == 2 and 0 < room.memory < psutil.virtual_memory().total
    assert room_in_cluster(t.model_copy(update={"num_cpus": 2})).actors == 1
    assert room_in_cluster(t.model_copy(update={"resources": {"big_mem": 1}})).actors == 0


def test_actors_that_cannot_all_run_at_once_are_refused_before_any_shard(labelled, tmp_path):
    """Five actors of half a CPU on a 2-CPU Ray: the fifth would never start and hold its shards."""
    cfg = labelled[0].model_copy(deep=True)
    cfg.store.uri = str(tmp_path / "store")
    for t in cfg.teachers:
        t.group, t.replicas = "both", 5
    with pytest.raises(UserError, match=r"^teachers: their label actors ask for 2.5 CPU at once \(actors: 5 × "
                                        r"mlp_a\+mlp_b\), but this Ray cluster has 2; lower the teachers' replicas"):
        ekd.label(cfg, progress=False)
    assert not list((tmp_path / "store").rglob("*.parquet"))


def test_grouped_teachers_must_share_resources(tmp_path, digits_dir):
    raw = tiny_config(tmp_path, digits_dir)
    raw["teachers"][0].update(group="g", num_cpus=0.5)
    raw["teachers"][1].update(group="g", num_cpus=0.25)
    with pytest.raises(UserError, match="share group 'g' .* but not replicas/num_cpus/num_gpus/resources"):
        ekd.load_config(write_config(tmp_path, raw), check=False)
    raw["teachers"][1].update(num_cpus=0.5, resources={"big_mem": 1})
    with pytest.raises(UserError, match="share group 'g' .* but not replicas/num_cpus/num_gpus/resources"):
        ekd.load_config(write_config(tmp_path, raw), check=False)


def test_a_custom_resource_no_node_has_is_refused_before_any_shard(labelled, tmp_path):
    cfg = labelled[0].model_copy(deep=True)
    cfg.store.uri = str(tmp_path / "store")
    cfg.teachers[1].resources = {"big_mem": 1.0}
    with pytest.raises(UserError, match=r"^teacher 'mlp_b' \(num_cpus/num_gpus/resources\): asks for resources "
                                        r"\{'big_mem': 1.0\}, but no Ray node has them \(custom resources of this "
                                        r"cluster: none\); fix it or start a node with `ray start --resources`$"):
        ekd.label(cfg, progress=False)
    assert not list((tmp_path / "store").rglob("*.parquet"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_teachers_share_one_gpu_in_halves_and_label_what_the_cpu_did(labelled, tmp_path):
    """num_gpus: 0.5 each: two label actors on one GPU (GPU teachers keep their own pools), and
    their float16 logits are the CPU run's within float16 and kernel rounding."""
    cfg = labelled[0].model_copy(deep=True)
    cfg.store.uri = str(tmp_path / "store")
    for t in cfg.teachers:
        t.num_gpus = 0.5
    result = ekd.label(cfg, progress=False)
    assert result.actors == [{"teachers": ["mlp_a"], "replicas": 1}, {"teachers": ["mlp_b"], "replicas": 1}]
    on_gpu, on_cpu = Store.open(cfg.store.uri), Store.open(labelled[0].store.uri)
    for name in ("mlp_a", "mlp_b"):
        ids, gpu, _ = classification.decode(on_gpu.read_table("train", name, 0))
        ids_cpu, cpu, _ = classification.decode(on_cpu.read_table("train", name, 0))
        assert np.array_equal(ids, ids_cpu)
        np.testing.assert_allclose(gpu.astype(np.float32), cpu.astype(np.float32), atol=2e-2, rtol=1e-2)


def test_two_label_runs_started_together_fit_each_teacher_once(tmp_path, digits_dir):
    """Two `ensemblekd label` on one new store, started at once, as a user might: the store's lock
    covers the fit, so one run fits and labels everything and the other, once it holds the lock,
    finds the teachers fitted and the store complete (fitted twice, a nondeterministic fit would
    leave shards labelled by a checkpoint the other run then overwrote)."""
    import subprocess
    import sys

    config = write_config(tmp_path, tiny_config(tmp_path, digits_dir))
    runs = [subprocess.Popen([sys.executable, "-m", "ensemblekd", "label", str(config), "--no-progress"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outs]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("fitted teacher 'mlp_a'") == 1 and stdout.count("fitted teacher 'mlp_b'") == 1, stdout
    assert sum("labelled 0 shard(s)" in out for out, _ in outs) == 1, stdout
    assert sum("is being written by pid" in err for _, err in outs) == 1  # the second said why it waited
    assert all(ok for *_, ok, _ in ekd.open_store(str(tmp_path / "store")).verify())
