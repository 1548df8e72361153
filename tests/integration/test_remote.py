"""The store on S3 and tracking on an MLflow server: both real servers on 127.0.0.1 (moto's S3
server; `mlflow server` with a SQLite database and an artifact root), started and stopped here.

One tiny pipeline run (real Ray actors label into s3://, two Ray Train workers running DeepSpeed
distil from it) logs to the MLflow server; the tests then look at the bucket, the CLI and the
server the way a user would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

import ensemblekd as ekd
from ensemblekd.testing import tiny_config, write_config
from servers import KEY, SECRET, moto_server, s3fs_client, tracking_server

pytestmark = pytest.mark.integration

BUCKET = "ekd-remote-test"
STORE = f"s3://{BUCKET}/store"
EPOCHS = 2


def cli(*args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ensemblekd", *map(str, args)], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port with one empty bucket; yields the endpoint URL."""
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        s3fs_client(endpoint).mkdir(BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and a served artifact root; yields (URL, artifact root)."""
    with tracking_server(tmp_path_factory.mktemp("mlflow_server")) as served:
        yield served


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory, digits_dir, ray_local, s3, mlflow_server):
    """The tiny pipeline with its store in the bucket and its tracking on the server."""
    import mlflow

    import ensemblekd as ekd
    from ensemblekd.io import fs as storage

    tmp = tmp_path_factory.mktemp("remote")
    tracking_before = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also sets it
    options = {"endpoint_url": s3, "key": KEY, "secret": SECRET}
    cfg = ekd.load_config(write_config(tmp, tiny_config(
        tmp, digits_dir, store={"uri": STORE, "storage_options": options}, trainer={"epochs": EPOCHS, "num_workers": 2},
        tracking={"uri": mlflow_server[0], "experiment": "remote"})))
    try:
        yield cfg, ekd.run(cfg, progress=False), tmp
    finally:  # later tests in this process must not reach the stopped servers
        storage.configure("s3", {})
        mlflow.set_tracking_uri(tracking_before)


def manifest_of(fs, prefix: str = f"{BUCKET}/store") -> dict:
    return json.loads(fs.cat_file(f"{prefix}/manifest.json"))


# -- the store on S3 ------------------------------------------------------------------------------
def test_the_bucket_holds_the_manifest_and_exactly_the_shards_it_lists(remote_run, s3):
    fs = s3fs_client(s3)
    manifest = manifest_of(fs)
    assert set(manifest["teachers"]) == {"mlp_a", "mlp_b"} and manifest["num_classes"] == 10
    listed = set()
    for split in ("train", "val", "test"):
        assert len(manifest["inputs"][split]) > 0
        for teacher in ("mlp_a", "mlp_b"):
            entries = manifest["shards"][split][teacher]
            assert len(entries) == len(manifest["inputs"][split])
            listed |= {f"{BUCKET}/store/{e['path']}" for e in entries.values()}
    assert set(fs.find(f"{BUCKET}/store")) == listed | {f"{BUCKET}/store/manifest.json"}  # no lock left either
    assert not [key for key in fs.find(BUCKET) if ".tmp" in key]        # no temporary objects anywhere
    for e in (e for per_split in manifest["shards"].values() for t in per_split.values() for e in t.values()):
        assert fs.size(f"{BUCKET}/store/{e['path']}") == e["bytes"]


def test_inspect_verifies_every_checksum_with_the_endpoint_from_the_environment(remote_run, s3, tmp_path):
    manifest = manifest_of(s3fs_client(s3))
    total = sum(len(t) for per_split in manifest["shards"].values() for t in per_split.values())
    env = {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    proc = cli("inspect", STORE, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"checksums: {total}/{total} verified" in proc.stdout
    assert re.search(r"train mlp_a: (\d+)/\1 shards", proc.stdout), proc.stdout


def test_a_reader_trusts_the_manifest_only_and_sees_other_processes_writes(remote_run, s3):
    """Another process (here a subprocess, in the pipeline a label actor or the driver) replaces a
    shard and the manifest after this process listed and read them: this process must see the new
    objects, not fsspec's cached listing; an object the manifest does not list is never read."""
    from ensemblekd import UserError
    from ensemblekd.io import fs as storage
    from ensemblekd.store import Store
    from ensemblekd.tasks import classification

    fs = s3fs_client(s3)
    fs.copy(f"{BUCKET}/store", f"{BUCKET}/copy", recursive=True)
    copy = f"s3://{BUCKET}/copy"
    shard = f"{copy}/train/mlp_a/part-00000.parquet"
    store = Store.open(copy)
    assert storage.list_parquet(f"{copy}/train/mlp_a")               # caches the listing (sizes, ETags)
    old_size = storage.file_size(shard)
    classification.decode(store.read_table("train", "mlp_a", 0))

    manifest = manifest_of(fs, f"{BUCKET}/copy")
    manifest["note"] = "rewritten by another process"
    code = (f"import s3fs, json; fs = s3fs.S3FileSystem(endpoint_url={s3!r}, key={KEY!r}, secret={SECRET!r}); "
            f"fs.pipe_file({shard.removeprefix('s3://')!r}, b'not parquet, longer than before' * 100); "
            f"fs.pipe_file({BUCKET + '/copy/train/mlp_a/part-09999.parquet'!r}, b'unlisted'); "
            f"fs.pipe_file({BUCKET + '/copy/manifest.json'!r}, json.dumps({manifest!r}).encode())")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    assert ekd.open_store(copy).manifest.get("note") == "rewritten by another process"
    assert storage.file_size(shard) == 3100 != old_size
    assert storage.read_bytes(shard).startswith(b"not parquet")
    bad = [(split, t, i, why) for split, t, i, ok, why in ekd.open_store(copy).verify() if not ok]
    assert bad == [("train", "mlp_a", 0, f"3100 bytes, manifest says {manifest['shards']['train']['mlp_a']['0']['bytes']}")]
    assert "9999" not in ekd.open_store(copy).manifest["shards"]["train"]["mlp_a"]
    with pytest.raises(UserError, match="checksum mismatch"):
        classification.decode(Store.open(copy).read_table("train", "mlp_a", 0))


def test_a_missing_bucket_is_one_line_and_is_not_created(remote_run, s3, tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, store={"uri": "s3://no-such-bucket/store",
                                                   "storage_options": {"endpoint_url": s3, "key": KEY, "secret": SECRET}})
    config = write_config(tmp_path, cfg)
    proc = cli("label", config, "--no-progress", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        (f"ensemblekd: error: {config}: store.uri: bucket 'no-such-bucket' of 's3://no-such-bucket/store' does not "
         "exist; create it or fix store.uri")]
    assert not s3fs_client(s3).exists("no-such-bucket")


def test_an_unreachable_endpoint_is_one_line(tmp_path):
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_MAX_ATTEMPTS": "1"}  # botocore's retries only add time here
    proc = cli("inspect", STORE, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot use the object store" in lines[0] and "AWS_ENDPOINT_URL" in lines[0], proc.stderr


def test_storage_options_need_an_object_store_uri(tmp_path, digits_dir):
    import ensemblekd as ekd
    from ensemblekd import UserError

    cfg = tiny_config(tmp_path, digits_dir, store={"storage_options": {"endpoint_url": "http://127.0.0.1:9"}})
    with pytest.raises(UserError, match="store.storage_options: only used with an object-store store.uri"):
        ekd.load_config(write_config(tmp_path, cfg), check=False)


# -- tracking on the MLflow server ----------------------------------------------------------------
def test_the_server_has_the_run_its_params_and_metrics(remote_run, mlflow_server, s3):
    from mlflow.tracking import MlflowClient

    _, result, _ = remote_run
    client = MlflowClient(mlflow_server[0])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.tracking_uri == mlflow_server[0]
    assert client.get_experiment(run.info.experiment_id).name == "remote"
    p, m = run.data.params, run.data.metrics
    assert p["trainer.epochs"] == str(EPOCHS) and p["store.uri"] == STORE
    assert p["store.storage_options.endpoint_url"] == s3                      # credentials are not logged
    assert p["store.storage_options.secret"] == "***" and p["store.storage_options.key"] == "***"
    assert SECRET not in json.dumps(p) and KEY not in json.dumps(p)
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(history) == EPOCHS and len({h.step for h in history}) == EPOCHS   # one per epoch
    report = {row.model: row.accuracy for row in result.evaluation.rows}
    assert m["test_accuracy.student"] == pytest.approx(report["student"]) and report["student"] > 0.2  # chance: 0.1
    assert m["test_accuracy.ensemble"] == pytest.approx(report["ensemble"]) and report["ensemble"] > 0.9
    for key in ("train_loss", "loss", "teacher_val_accuracy.mlp_a", "student_fidelity"):
        assert key in m


def test_the_server_stores_the_artifacts_and_the_model_loads_and_predicts(remote_run, mlflow_server):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from ensemblekd.testing import build_module, load_state, read_split

    cfg, result, tmp = remote_run
    url, artifact_root = mlflow_server
    client = MlflowClient(url)
    run = client.get_run(result.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")       # proxied through the server
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "student.pt", "store", "report"} <= top
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp))).read_text()
    assert SECRET not in config_yaml and "endpoint_url" in config_yaml
    assert any(p.name == "student.pt" for p in artifact_root.rglob("*"))  # landed in the server's root

    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [mdl.name for mdl in models] == ["student"]
    mlflow.set_tracking_uri(url)
    logged = mlflow.pytorch.load_model(models[0].model_uri)
    _, x, _ = read_split(cfg.data.test, cfg.data.features, None, cfg.data.id)
    student = load_state(build_module(cfg.student.model, cfg.student.kwargs), result.student, "student")
    with torch.no_grad():
        got, want = logged(torch.from_numpy(x)), student(torch.from_numpy(x))
    assert got.shape == (len(x), 10) and torch.equal(got.argmax(1), want.argmax(1))
