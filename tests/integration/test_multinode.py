"""Several Ray nodes with no shared disk, and the loss of a node mid-label and mid-distill.

One cluster on this machine (tests/ray_cluster.py): a head with no CPU (it runs the job's driver and
Ray Train's controller) and three worker nodes of one CPU each, node 1 with one logical GPU, each
node its own `ray start` with its own temp dir and token authentication on. Everything the nodes
read and write is in moto's S3 server (the data, the teachers' checkpoints, the store,
trainer.output_dir with Ray Train's checkpoints); tracking is an MLflow server. The full pipeline is
submitted with `ray job submit`; then one worker node is lost (its raylet killed by process id)
in the middle of a label run, and another in the middle of a distill run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from ensemblekd.testing import tiny_config
from ray_cluster import Cluster, ray_cli, ray_cluster, runtime_env_for_test
from servers import KEY, SECRET, moto_server, s3fs_client, tracking_server

pytestmark = pytest.mark.integration

BUCKET = "ekd-cluster"
S3 = f"s3://{BUCKET}"
SPLITS, TEACHERS = ("train", "val", "test"), ("mlp_a", "mlp_b")
TESTS = Path(__file__).resolve().parents[1]  # faulty_models (slow teachers) is imported from there


@pytest.fixture(scope="module")
def servers(tmp_path_factory, digits_dir):
    """moto's S3 server with the digits data in the bucket, and an MLflow server."""
    from ensemblekd.io import fs as storage

    tmp = tmp_path_factory.mktemp("servers")
    with moto_server(tmp) as endpoint, tracking_server(tmp) as (tracking_uri, _):
        bucket = s3fs_client(endpoint)
        bucket.mkdir(BUCKET)
        for path in digits_dir.rglob("*.parquet"):
            bucket.put_file(str(path), f"{BUCKET}/data/{path.relative_to(digits_dir)}")
        storage.configure("s3", {"endpoint_url": endpoint, "key": KEY, "secret": SECRET})  # for Store.open here
        try:
            yield {"endpoint": endpoint, "tracking_uri": tracking_uri}
        finally:
            storage.configure("s3", {})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, servers):
    aws = {"AWS_ENDPOINT_URL": servers["endpoint"], "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(TESTS)}
    workers = [{"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1}, {"num_cpus": 1}]
    with ray_cluster(tmp_path_factory.mktemp("ray"), workers, env=aws) as running:
        yield running


def cluster_config(name: str, servers, **sections) -> dict:
    """The tiny config with every path in the bucket, under runs/<name>, trained by two Ray Train
    workers (placement across nodes is what these tests are about)."""
    sections["trainer"] = {"num_workers": 2, **sections.get("trainer", {})}
    cfg = tiny_config(Path("/nowhere"), Path("/nowhere"), **sections)
    cfg["data"] = {split: f"{S3}/data/{split}" for split in SPLITS}
    for t in cfg["teachers"]:
        t["checkpoint"] = f"{S3}/teachers/{t['name']}.pt"
    cfg["store"] = {"uri": f"{S3}/runs/{name}/store"}
    cfg["trainer"]["output_dir"] = f"{S3}/runs/{name}/out"
    cfg["tracking"] = {"uri": servers["tracking_uri"], "experiment": name}
    cfg["ray"] = {}  # ray.address comes from the command line
    cfg["evaluate"] = {"repeats": 5, "warmup": 1}
    return cfg


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def manifest(servers, name: str) -> dict:
    """The store's manifest as a reader sees it: manifest.json plus its commit log (while a run goes)."""
    import ensemblekd as ekd
    from ensemblekd import UserError

    try:
        return ekd.open_store(f"{S3}/runs/{name}/store").manifest
    except UserError:  # not there yet
        return {"shards": {}}


def checksums(m: dict) -> dict[tuple[str, str, str], str]:
    return {(s, t, i): e["sha256"] for s, per in m["shards"].items() for t, es in per.items() for i, e in es.items()}


def driver(cluster: Cluster, *args, cwd: Path) -> subprocess.Popen:
    """`ensemblekd ...` as a driver that joins the cluster from outside a job (with the token)."""
    return subprocess.Popen([sys.executable, "-m", "ensemblekd", *map(str, args), "--no-progress",
                             "--set", f"ray.address={cluster.gcs}"], cwd=cwd, env=cluster.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"exited before {what}:\n{proc.communicate()[1][-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def alive_actors(cluster: Cluster, class_name: str) -> list[dict]:
    listed = ray_cli("list", "actors", "--address", cluster.url, "--filter", f"class_name={class_name}",
                     "--filter", "state=ALIVE", "--format", "json", env=cluster.env)
    return parse_json_list(listed.stdout) if listed.returncode == 0 else []


def parse_json_list(stdout: str) -> list:
    """`ray list ... --format json`'s list (Ray may print a line or two before it)."""
    start = stdout.find("[")
    return json.loads(stdout[start:]) if start >= 0 else []


def node_name(cluster: Cluster, node_id: str) -> str:
    return {v: k for k, v in cluster.node_ids().items()}[node_id]


# -- the pipeline, submitted ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def submitted(cluster, servers, tmp_path_factory):
    """`ensemblekd run` by `ray job submit`: mlp_a asks for node 2's tag, mlp_b for half a GPU (node 1
    has the only one), and each Ray Train worker for a whole CPU (so the two cannot share a node)."""
    tmp = tmp_path_factory.mktemp("submitted")
    cfg = cluster_config("submitted", servers, trainer={"epochs": 3, "cpus_per_worker": 1})
    cfg["teachers"][0]["resources"] = {"ekd_node_2": 0.5}
    cfg["teachers"][1]["num_gpus"] = 0.5
    config = write(tmp, cfg)
    job_id = f"ekd-multinode-{os.getpid()}"
    start = time.monotonic()
    submit = ray_cli("job", "submit", "--address", cluster.url, "--submission-id", job_id, "--working-dir", str(REPO),
                     "--runtime-env", str(runtime_env_for_test(tmp)), "--", "python", "-m", "ensemblekd", "run",
                     str(config), "--no-progress", "--set", "ray.address=auto", env=cluster.env, timeout=900)
    logs = ray_cli("job", "logs", "--address", cluster.url, job_id, env=cluster.env).stdout
    assert submit.returncode == 0, f"{submit.stderr[-3000:]}\n--- ray job logs ---\n{logs[-6000:]}"
    print(f"multi-node job: {time.monotonic() - start:.0f} s")
    run_id = next(line.split()[2] for line in logs.splitlines() if line.startswith("MLflow run: "))
    return {"cfg": cfg, "logs": logs, "run_id": run_id, "teacher_actors": teacher_placement(cluster)}


def teacher_placement(cluster: Cluster) -> list[str]:
    listed = ray_cli("list", "actors", "--address", cluster.url, "--filter", "class_name=TeacherWorker",
                     "--detail", "--format", "json", env=cluster.env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    return sorted(json.dumps(a["required_resources"], sort_keys=True) for a in parse_json_list(listed.stdout))


def test_a_client_without_the_token_is_refused(cluster, servers, tmp_path):
    refused = ray_cli("job", "list", "--address", cluster.url, env=cluster.env_without_token)
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr
    config = write(tmp_path, cluster_config("refused", servers))
    joined = subprocess.run([sys.executable, "-m", "ensemblekd", "label", str(config), "--no-progress", "--set",
                             f"ray.address={cluster.gcs}"], cwd=tmp_path, env=cluster.env_without_token,
                            capture_output=True, text=True, timeout=300)
    last = joined.stderr.strip().splitlines()[-1]  # after Ray's own retry warnings (InvalidAuthToken), ~20 s
    assert joined.returncode == 2 and last.startswith(
        f"ensemblekd: error: ray.address={cluster.gcs}: cannot join the Ray cluster") and (
        "set RAY_AUTH_MODE=token" in last), joined.stderr[-3000:]  # a driver outside a job needs the token


def test_shards_were_labelled_on_the_nodes_their_teachers_asked_for(submitted, cluster, servers):
    m = manifest(servers, "submitted")
    nodes = cluster.node_ids()
    for split in SPLITS:
        assert len(m["shards"][split]["mlp_a"]) == len(m["inputs"][split]) > 0
        written = {t: {e["written_by"]["node_id"] for e in m["shards"][split][t].values()} for t in TEACHERS}
        assert written == {"mlp_a": {nodes["ekd_node_2"]}, "mlp_b": {nodes["ekd_node_1"]}}
    assert submitted["teacher_actors"] == ['{"CPU": 0.5, "GPU": 0.5}', '{"CPU": 0.5, "ekd_node_2": 0.5}']


def test_train_workers_ran_on_two_nodes_and_checkpointed_to_the_bucket(submitted, cluster, servers, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(servers["tracking_uri"])
    run = client.get_run(submitted["run_id"])
    assert run.data.tags["ensemblekd.train_nodes"] == "2"
    placements = json.loads(Path(client.download_artifacts(run.info.run_id, "distill/workers.json", str(tmp_path))).read_text())
    assert len(placements) == 1 and placements[0]["from_epoch"] == 0
    workers = placements[0]["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2 and {w["node_id"] for w in workers} <= set(cluster.node_ids().values())

    bucket = s3fs_client(servers["endpoint"])
    out = f"{BUCKET}/runs/submitted/out"
    assert bucket.exists(f"{out}/student.pt")
    checkpoints = [p for p in bucket.find(f"{out}/ray_train") if "/checkpoint_" in p]
    assert checkpoints, bucket.find(out)  # Ray Train's own checkpoints: in the bucket, not on a node


def test_the_run_and_the_student_reach_the_mlflow_server(submitted, servers):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(servers["tracking_uri"])
    run = client.get_run(submitted["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["ray.address"] == "auto"
    assert run.data.metrics["test_accuracy.student"] > 0.5
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["student"]


@pytest.mark.parametrize("key", ["store.uri", "trainer.output_dir"])
def test_a_local_path_on_a_cluster_of_several_nodes_is_refused(submitted, cluster, servers, tmp_path, key):
    cfg = cluster_config("submitted", servers)
    section, name = key.split(".")
    cfg[section][name] = str(tmp_path / "local")
    stage = "label" if key == "store.uri" else "distill"
    proc = driver(cluster, stage, write(tmp_path, cfg), cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().splitlines()[-1] == (
        f"ensemblekd: error: {key}={tmp_path / 'local'}: a local path, but this Ray cluster has 4 nodes, each with its "
        "own disk; use object storage (s3://...) or, if it is a filesystem mounted at the same path on every node, "
        "set ray.shared_filesystem=true"), err[-3000:]
    assert not (tmp_path / "local").exists() or not any((tmp_path / "local").rglob("*.parquet"))


# -- losing a node --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def label_with_a_node_lost(submitted, cluster, servers, tmp_path_factory):
    """The submitted run's teachers, slowed down and placed anywhere, label a fresh store; once two
    shards are committed, the node of a label actor is lost."""
    tmp = tmp_path_factory.mktemp("label_loss")
    cfg = cluster_config("label_loss", servers)
    for t in cfg["teachers"]:
        t.update(model="faulty_models:slow_mlp", kwargs={**t["kwargs"], "delay": 0.3}, fit=None)
    proc = driver(cluster, "label", write(tmp, cfg), cwd=tmp)
    wait_for(lambda: len(checksums(manifest(servers, "label_loss"))) >= 2, proc, "two committed shards")
    actor = wait_for(lambda: alive_actors(cluster, "TeacherWorker"), proc, "a label actor")[0]
    lost = node_name(cluster, actor["node_id"])
    cluster.lose(lost)
    out, err = proc.communicate(timeout=600)
    return {"returncode": proc.returncode, "err": err, "lost": lost, "lost_id": actor["node_id"], "cfg": cfg}


def test_label_finishes_with_the_same_checksums_after_losing_a_node(label_with_a_node_lost, servers):
    result = label_with_a_node_lost
    assert result["returncode"] == 0, result["err"][-3000:]
    m = manifest(servers, "label_loss")
    assert checksums(m) == checksums(manifest(servers, "submitted"))  # as an uninterrupted run wrote them
    writers = [e["written_by"]["node_id"] for per in m["shards"].values() for t in per.values() for e in t.values()]
    assert result["lost_id"] in writers and set(writers) - {result["lost_id"]}  # before, and after, the loss


def test_distill_resumes_on_another_node_after_losing_one(label_with_a_node_lost, cluster, servers, tmp_path):
    """Two workers of half a CPU each share a node (Ray Train packs them); once two epochs are
    reported (each after its checkpoint is in the bucket), that node is lost, and the workers resume
    from the last checkpoint in the bucket on another node."""
    from mlflow.tracking import MlflowClient

    assert label_with_a_node_lost["returncode"] == 0
    epochs = 12
    cfg = cluster_config("label_loss", servers, trainer={"epochs": epochs})
    nodes = {v: k for k, v in cluster.node_ids().items()}
    proc = driver(cluster, "distill", write(tmp_path, cfg), cwd=tmp_path)
    client = MlflowClient(servers["tracking_uri"])
    workers = wait_for(lambda: alive_actors(cluster, "RayTrainWorker"), proc, "the train workers")
    lost = {nodes[w["node_id"]] for w in workers}
    assert len(lost) == 1, lost

    def reported():
        runs = client.search_runs([e.experiment_id for e in client.search_experiments(filter_string="name = 'label_loss'")])
        return next((r for r in runs if len(client.get_metric_history(r.info.run_id, "val_accuracy")) >= 2), None)

    run = wait_for(reported, proc, "two reported epochs")
    cluster.lose(lost.pop())
    at_loss = len(client.get_metric_history(run.info.run_id, "val_accuracy"))
    assert at_loss < epochs, "the run must be lost mid-way"
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    run_id = run.info.run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_accuracy")) == list(range(epochs))  # once each
    resumed = client.get_metric_history(run_id, "resumed_from_epoch")
    # from the last checkpoint in the bucket: at least the two reported before the loss (the lost
    # node's workers can report an epoch or two more before they notice their raylet is gone)
    assert len(resumed) == 1 and 2 <= resumed[0].value < epochs
    placements = json.loads(Path(client.download_artifacts(run_id, "distill/workers.json", str(tmp_path))).read_text())
    assert len(placements) == 2 and placements[1]["from_epoch"] == resumed[0].value
    before, after = ({w["node_id"] for w in p["workers"]} for p in placements)
    assert before.isdisjoint(after) and len(after) == 1  # resumed on another node
    assert s3fs_client(servers["endpoint"]).exists(f"{BUCKET}/runs/label_loss/out/student.pt")
