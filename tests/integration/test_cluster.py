"""The cluster path as the README's "Run on a cluster" gives it: a real Ray head on 127.0.0.1 started with
`ray start --head` (token authentication on, one logical GPU), `ensemblekd run` submitted to it with
`ray job submit --working-dir <this repository>`, then the store, the MLflow run and where the actors ran."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, tiny_config, write_config

RAY = str(Path(sys.executable).with_name("ray"))
SPLITS, TEACHERS = ("train", "val", "test"), ("mlp_a", "mlp_b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def cli(*args, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemblekd", *map(str, args), "--no-progress"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


@contextmanager
def ray_head(log: Path):
    """`ray start --head --block` in a session of its own, on free ports and a temp dir of its own (nothing
    shared with other Ray instances on the machine); stopped by its process id, then checked gone."""
    temp_dir = tempfile.mkdtemp(prefix="ekd-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token, gcs, dashboard = secrets.token_hex(32), free_port(), free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # else Ray swaps 127.0.0.1 for the machine's address
    head_env = {**env, **auth,
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops at once, not after a 30 s drain
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}  # the job's `python`
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=1",
           "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_jobs_api(url, token, proc, log)
        yield {"url": url, "gcs": f"127.0.0.1:{gcs}", "env": {**env, **auth}, "env_without_token": env}
    finally:
        left = stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray head processes left running: {left}"


def wait_for_jobs_api(url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the head's job API did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, temp_dir: str) -> list[str]:
    """SIGTERM to `ray start` (it stops raylet, GCS and the rest in order; SIGTERM to all of them at once
    leaves the raylet retrying a dead GCS), then SIGKILL to its process group and to any process of the
    head still running (Ray moves workers to process groups of their own); returns those left alive."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    proc.terminate()
    with suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in filter(running, procs):
        with suppress(psutil.NoSuchProcess):
            p.kill()
    deadline = time.monotonic() + 10
    while any(running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.wait(10)
    by_dir = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    return sorted(f"{p.pid} {p.name()}" for p in {*procs, *by_dir} if running(p))


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def runtime_env_for_test(tmp_path: Path) -> Path:
    """cluster/runtime_env.yaml without `pip`: Ray would first copy this whole virtualenv (gigabytes) to add
    packages it already has (test_runtime_env_pip_is_the_project_dependencies checks the list instead)."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip", None)
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


@pytest.mark.integration
def test_run_submitted_to_a_ray_cluster(tmp_path, digits_dir):
    """Teacher mlp_b asks for half a GPU (the head advertises one; without CUDA the teacher runs on CPU), mlp_a
    and the Ray Train workers for CPUs only: all placed by resources on the existing cluster."""
    cfg = tiny_config(tmp_path, digits_dir, trainer={"epochs": 3})
    cfg["teachers"][1]["num_gpus"] = 0.5
    cfg["ray"] = {}  # no num_cpus: that is for a local Ray; ray.address=auto comes from the command line
    config = write_config(tmp_path, cfg)
    job_id = f"ekd-test-{secrets.token_hex(4)}"
    start = time.monotonic()
    with ray_head(tmp_path / "head.log") as head:
        refused = ray_cli("job", "list", "--address", head["url"], env=head["env_without_token"])
        assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr
        joined = cli("label", config, "--set", f"ray.address={head['gcs']}", env=head["env_without_token"])
        last = joined.stderr.strip().splitlines()[-1]  # after Ray's own retry warnings (InvalidAuthToken), ~20 s
        assert joined.returncode == 2 and last.startswith(
            f"ensemblekd: error: ray.address={head['gcs']}: cannot join the Ray cluster") and (
            "set RAY_AUTH_MODE=token" in last), joined.stderr[-3000:]  # a driver outside a job needs the token

        submit = ray_cli("job", "submit", "--address", head["url"], "--submission-id", job_id,
                         "--working-dir", str(REPO), "--runtime-env", str(runtime_env_for_test(tmp_path)), "--",
                         "python", "-m", "ensemblekd", "run", str(config), "--no-progress", "--set", "ray.address=auto",
                         env=head["env"], timeout=720)
        jobs = ray_cli("list", "jobs", "--address", head["url"], "--filter", f"submission_id={job_id}",
                       "--format", "json", env=head["env"])
        logs = ray_cli("job", "logs", "--address", head["url"], job_id, env=head["env"]).stdout
        status = [(j["status"], j["message"]) for j in json.loads(jobs.stdout or "[]")]
        assert submit.returncode == 0 and status and status[0][0] == "SUCCEEDED", (
            f"{status} {jobs.stderr[-1000:]}\n--- ray job submit ---\n{submit.stderr[-3000:]}\n"
            f"--- ray job logs ---\n{logs[-6000:]}")
        assert "Uploading package" in submit.stdout + submit.stderr  # the working dir went up as a package

        listed = ray_cli("list", "actors", "--address", head["url"], "--filter", "class_name=TeacherWorker",
                         "--detail", "--format", "json", env=head["env"])
        assert listed.returncode == 0, listed.stderr[-2000:]
        placed = sorted(json.dumps(a["required_resources"], sort_keys=True) for a in json.loads(listed.stdout))
        assert placed == ['{"CPU": 0.5, "GPU": 0.5}', '{"CPU": 0.5}'], placed  # on this cluster, by resources
    print(f"cluster run: {time.monotonic() - start:.0f} s (head start, job, head stop)")

    from ensemblekd.store import Store

    store = Store.open(str(tmp_path / "store"))
    for split in SPLITS:
        store.check_complete(split, list(TEACHERS))
    checks = store.verify()
    assert len(checks) == 2 * sum(len(store.inputs(s)) for s in SPLITS) and all(c[3] for c in checks), checks

    from mlflow.tracking import MlflowClient

    run_id = next(line.split()[2] for line in logs.splitlines() if line.startswith("MLflow run: "))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["ray.address"] == "auto"
    assert run.data.metrics["test_accuracy.student"] > 0.5
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["student"]


def test_runtime_env_pip_is_the_project_dependencies():
    """What cluster/runtime_env.yaml installs is pyproject.toml's dependencies less Ray (the cluster's own
    version must be used), plus the s3 and lm extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [d for d in project["dependencies"] if not d.startswith("ray")] + project["optional-dependencies"]["s3"] \
        + project["optional-dependencies"]["lm"]
    assert yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["pip"] == wanted


@pytest.mark.parametrize("where", ["ray.address", "RAY_ADDRESS"])
def test_an_address_where_no_ray_listens_is_one_line_at_once(tmp_path, digits_dir, where):
    """Ray itself retries such an address for minutes; with RAY_ADDRESS set, ray.address=auto means it."""
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if where == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    config = write_config(tmp_path, tiny_config(tmp_path, digits_dir))
    start = time.monotonic()
    proc = cli("label", config, "--set", f"ray.address={address if where == 'ray.address' else 'auto'}",
               env=env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        (f"ensemblekd: error: {where}={address}: no Ray cluster answers there (Connection refused); start one with "
         "`ray start --head`, fix the address, or unset it to start a local Ray")], proc.stderr
    assert time.monotonic() - start < 60


def test_cluster_launcher_config_is_valid_and_installs_the_runtime_env_packages():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema, as `ray up` checks it
    pip = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["pip"]
    deps = config["head_setup_commands"][1].split()
    assert [d.strip('"') for d in deps[3:]] == [p for p in pip if not p.startswith("torch")]


def test_rayjob_runs_the_demo_config_with_the_runtime_env():
    import shlex

    import ensemblekd as ekd

    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["pip"] == yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["pip"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:5] == ["python", "-m", "ensemblekd", "run", "configs/digits.yaml"]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = ekd.load_config(str(REPO / argv[4]), overrides, check=False)   # every key exists
    assert cfg.ray.address == "auto" and cfg.teachers[2].num_gpus == 0.5
    assert all(uri.startswith("s3://") for uri in (cfg.data.train, cfg.store.uri, cfg.trainer.output_dir,
                                                   *(t.checkpoint for t in cfg.teachers)))
