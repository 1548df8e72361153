"""Faults survived, nothing lost: a killed teacher actor, a killed driver, a killed Ray Train
worker, a corrupt shard, two label runs at once, and an input that does not fit the teacher.

The reference for "nothing lost" is the `labelled` store: an uninterrupted label run of the same
teachers. Teachers here are `faulty_models:slow_mlp` (the same weights, a sleep per forward) so
that there is time to kill something while the work is in flight.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

import ensemblekd as ekd
from ensemblekd import tracking
from ensemblekd import UserError
from ensemblekd.stages.distill import distill
from ensemblekd.store import LOCK, Store
from ensemblekd.testing import build_module, save_state

pytestmark = pytest.mark.integration
TESTS = Path(__file__).resolve().parents[1]  # tests/: faulty_models is imported from there


def checksums(uri: str) -> dict[tuple[str, str, str], str]:
    shards = ekd.open_store(uri).manifest["shards"]
    return {(s, t, i): e["sha256"] for s, per in shards.items() for t, es in per.items() for i, e in es.items()}


def slow_config(labelled, tmp_path: Path, delay: float) -> Path:
    """The labelled config's teachers, slowed down, writing into a fresh store under tmp_path."""
    cfg, _ = labelled
    raw = cfg.to_dict()
    raw["store"]["uri"] = str(tmp_path / "store")
    raw["trainer"]["output_dir"] = str(tmp_path / "out")
    for t in raw["teachers"]:
        t.update(model="faulty_models:slow_mlp", kwargs={**t["kwargs"], "delay": delay}, fit=None)
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.Popen([sys.executable, "-m", "ensemblekd", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **popen)


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def actors(**filters) -> list:
    """Actors of this test session's Ray (other Ray instances may run on the machine)."""
    import ray
    from ray.util.state import list_actors
    return list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                       filters=[(k, "=", v) for k, v in filters.items()])


def committed(uri: str) -> int:
    try:
        return len(checksums(uri))
    except (UserError, FileNotFoundError, ValueError):
        return 0


def test_killed_teacher_actor_is_restarted_and_its_shard_redone(labelled, tmp_path):
    cfg = ekd.load_config(slow_config(labelled, tmp_path, delay=0.25))
    killed = {}

    def kill_one_actor():
        wait_for(lambda: committed(cfg.store.uri) >= 2, what="two committed shards")
        actor = actors(class_name="TeacherWorker", state="ALIVE")[0]
        os.kill(actor.pid, signal.SIGKILL)
        killed.update(id=actor.actor_id, pid=actor.pid, at=committed(cfg.store.uri))

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    result = ekd.label(cfg, progress=False)
    killer.join()

    total = len(checksums(labelled[0].store.uri))
    assert 2 <= killed["at"] < total and result.shards == total
    restarted = actors(actor_id=killed["id"])[0]
    assert restarted.num_restarts >= 1
    assert checksums(cfg.store.uri) == checksums(labelled[0].store.uri)  # identical to an uninterrupted run
    assert all(ok for *_, ok, _ in ekd.open_store(cfg.store.uri).verify())


def test_killed_driver_loses_no_committed_shard(labelled, tmp_path):
    config = slow_config(labelled, tmp_path, delay=0.25)
    uri = str(tmp_path / "store")
    driver = cli("label", str(config), "--no-progress")
    try:
        wait_for(lambda: committed(uri) >= 4 or driver.poll() is not None, what="four committed shards")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        with_suppressed_lookup(lambda: os.killpg(driver.pid, signal.SIGKILL))  # its local Ray, if any is left
    before = Store.open(uri)
    done = checksums(uri)
    total = len(checksums(labelled[0].store.uri))
    assert 4 <= len(done) < total, "the driver must die with work left"
    assert os.path.exists(os.path.join(uri, LOCK))  # the dead run's lock is left behind ...
    mtimes = {k: os.stat(before.shard_uri(*k[:2], int(k[2]))).st_mtime_ns for k in done}

    result = ekd.label(ekd.load_config(config), progress=False)  # ... and taken over: its holder is dead

    assert result.shards == total - len(done)
    after = Store.open(uri)
    assert {k: os.stat(after.shard_uri(*k[:2], int(k[2]))).st_mtime_ns for k in done} == mtimes  # not recomputed
    assert checksums(uri) == checksums(labelled[0].store.uri)
    assert not os.path.exists(os.path.join(uri, LOCK))


def with_suppressed_lookup(fn):
    try:
        fn()
    except ProcessLookupError:
        pass


def test_two_label_runs_at_once_make_one_valid_store(labelled, tmp_path):
    config = slow_config(labelled, tmp_path, delay=0.1)
    runs = [cli("label", str(config), "--no-progress") for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    labelled_counts = sorted(int(out.split("labelled ")[1].split(" shard")[0]) for out, _ in outputs)
    total = len(checksums(labelled[0].store.uri))
    assert labelled_counts == [0, total]  # the second run waited, then found nothing left to do
    assert any("waiting for it to finish" in err for _, err in outputs)
    uri = str(tmp_path / "store")
    assert checksums(uri) == checksums(labelled[0].store.uri)
    assert all(ok for *_, ok, _ in ekd.open_store(uri).verify())
    assert not os.path.exists(os.path.join(uri, LOCK))


def test_killed_train_worker_resumes_from_the_last_checkpoint(labelled, tmp_path):
    from mlflow.tracking import MlflowClient
    cfg = labelled[0].model_copy(deep=True)
    cfg.trainer.num_workers, cfg.trainer.epochs, cfg.trainer.output_dir = 2, 12, str(tmp_path / "out")
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = {}

    def kill_one_worker():  # once three epochs are reported (logged after their checkpoint is persisted)
        client = MlflowClient(info["tracking_uri"])
        wait_for(lambda: len(client.get_metric_history(info["run_id"], "val_accuracy")) >= 3, what="three epochs")
        worker = actors(class_name="RayTrainWorker", state="ALIVE")[-1]
        os.kill(worker.pid, signal.SIGKILL)
        killed.update(pid=worker.pid)

    killer = threading.Thread(target=kill_one_worker)
    with tracking.mlflow_run(cfg, "distill") as info:
        killer.start()
        result = distill(cfg, info, progress=False)
    killer.join()

    assert killed and result.metrics["epoch"] == 11 and result.metrics["val_accuracy"] > 0.8
    client = MlflowClient(info["tracking_uri"])
    epochs = sorted(m.step for m in client.get_metric_history(info["run_id"], "val_accuracy"))
    assert epochs == list(range(12))  # every epoch once: none lost, none counted twice
    resumed = client.get_metric_history(info["run_id"], "resumed_from_epoch")
    assert len(resumed) == 1 and 3 <= resumed[0].value <= 11
    steps = [m.step for m in client.get_metric_history(info["run_id"], "loss")]
    assert len(steps) == len(set(steps))  # per-step curve: no step twice either


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_train_shard_is_refused_by_distill(labelled, tmp_path, damage):
    """A truncated shard is refused in the driver; a flipped byte by the worker's checksum (after
    trainer.max_failures retries, here 0)."""
    cfg = labelled[0].model_copy(deep=True)
    shutil.copytree(cfg.store.uri, tmp_path / "store")
    cfg.store.uri, cfg.trainer.output_dir, cfg.trainer.max_failures = str(tmp_path / "store"), str(tmp_path / "out"), 0
    shard = Path(Store.open(cfg.store.uri).shard_uri("train", "mlp_a", 2))
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        raw[200] ^= 0xFF
    shard.write_bytes(bytes(raw if damage == "flip" else raw[:-40]))
    reason = "checksum mismatch" if damage == "flip" else r"\d+ bytes, the manifest says"
    with pytest.raises(UserError, match=rf"train/mlp_a/part-00002.parquet: {reason}.*--repair"):
        ekd.distill(cfg, progress=False)


def test_feature_width_that_does_not_fit_a_teacher_is_one_line_and_writes_nothing(labelled, tmp_path):
    cfg, _ = labelled
    shutil.copytree(cfg.store.uri, tmp_path / "store")
    raw = cfg.to_dict()
    raw["store"]["uri"] = str(tmp_path / "store")
    narrow = {"name": "narrow", "model": "ensemblekd.models:mlp", "checkpoint": str(tmp_path / "narrow.pt"),
              "kwargs": {"in_features": 32, "num_classes": 10, "hidden": [16]}}
    save_state(build_module(narrow["model"], narrow["kwargs"]), narrow["checkpoint"])
    raw["teachers"] = [{**t, "fit": None} for t in raw["teachers"]] + [narrow]
    config = tmp_path / "narrow.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = checksums(raw["store"]["uri"])

    _, err = (run := cli("label", str(config), "--no-progress")).communicate(timeout=300)

    assert run.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "teacher 'narrow' failed on" in lines[0] and "data.features" in lines[0], err
    store = Store.open(raw["store"]["uri"])
    assert checksums(store.uri) == before and store.missing("train", "narrow") == list(range(len(store.inputs("train"))))
    assert all(ok for *_, ok, _ in store.verify())
