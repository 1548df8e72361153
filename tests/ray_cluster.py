"""A Ray cluster of several nodes on this one machine, for the cluster tests: a head and worker
nodes, each a `ray start --block` process of its own, with its own temp dir (no node shares a
Ray directory with another), its own ports, a node-tag resource, token authentication on, and
only 127.0.0.1 used. Stopped by process id, then checked gone; a worker node can be lost mid-run
by killing its raylet."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))
# `ray start --address` for a worker node. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray
# process on 127.0.0.1 (with 1, Ray binds its agents and GCS to the machine's address), but also
# makes `ray start` refuse to add a worker node; this launcher lifts that one check for itself and
# keeps its own address on 127.0.0.1. The processes it starts read the variable and stay on loopback.
WORKER_START = ("import sys; import ray._private.ray_constants as c; import ray._private.services as s; "
                "c.ENABLE_RAY_CLUSTER = True; s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
                "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


@dataclass
class Node:
    name: str                      # its node-tag resource: "ekd_head", "ekd_node_1", ...
    proc: subprocess.Popen         # `ray start --block`
    temp_dir: str
    log: Path

    def raylet(self) -> psutil.Process:
        return next(p for p in psutil.Process(self.proc.pid).children(recursive=True) if p.name() == "raylet")


@dataclass
class Cluster:
    url: str                       # the head's dashboard: `ray job submit --address`
    gcs: str                       # host:port, for `ray.address`
    env: dict[str, str]            # for clients: the token, and what the nodes were given
    env_without_token: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    def node_ids(self, starting: bool = False) -> dict[str, str]:
        """Node name (its tag) -> Ray node id of the alive nodes, from Ray's state API (which, while the
        cluster is `starting`, may not answer yet: then {})."""
        import json

        listed = ray_cli("list", "nodes", "--address", self.url, "--format", "json", "--detail", env=self.env)
        start = listed.stdout.find("[")  # Ray may print a line or two before the list
        if starting and (listed.returncode != 0 or start < 0):
            return {}
        assert listed.returncode == 0 and start >= 0, listed.stdout[-1000:] + listed.stderr[-2000:]
        tags = {n.name for n in self.nodes}
        return {tag: node["node_id"] for node in json.loads(listed.stdout[start:]) if node["state"] == "ALIVE"
                for tag in node["resources_total"] if tag in tags}

    def lose(self, name: str) -> None:
        """The node's raylet killed by its process id: the node is lost (its `ray start --block` ends
        the rest of it), the way a machine that dies takes its processes."""
        node = next(n for n in self.nodes if n.name == name)
        node.raylet().kill()


def ray_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@contextmanager
def ray_cluster(log_dir: Path, workers: list[dict], head: dict | None = None, env: dict[str, str] | None = None):
    """workers: one dict per worker node ({"num_cpus": 1, "num_gpus": 0}); head likewise (default: no
    CPU, so all work goes to the workers). env: given to every node (and so to every Ray process)."""
    token = secrets.token_hex(32)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    base["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # 127.0.0.1 only (see WORKER_START)
    node_env = {**base, **auth, **(env or {}),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops at once, not after a 30 s drain
                # a lost node is declared dead after about 3 s, not 30
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"}  # the job's `python`
    gcs, dashboard = free_port(), free_port()
    cluster = Cluster(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", {**base, **auth, **(env or {})},
                      {**base, **(env or {})})
    head = {"num_cpus": 0, "num_gpus": 0, **(head or {})}
    try:
        cluster.nodes.append(_start(log_dir, "ekd_head", [
            RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}"], head, node_env))
        wait_for_jobs_api(cluster.url, token, cluster.nodes[0])
        for i, spec in enumerate(workers, 1):
            cluster.nodes.append(_start(log_dir, f"ekd_node_{i}", [
                sys.executable, "-c", WORKER_START, "start", f"--address={cluster.gcs}"], spec, node_env))
        wait_for_nodes(cluster, len(workers) + 1)
        yield cluster
    finally:
        left = [p for node in reversed(cluster.nodes) for p in stop(node)]
    assert not left, f"Ray processes left running: {left}"


def _start(log_dir: Path, name: str, cmd: list[str], spec: dict, env: dict[str, str]) -> Node:
    import json

    temp_dir = tempfile.mkdtemp(prefix="ekd-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    cmd = [*cmd, "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", *ports,
           f"--num-cpus={spec['num_cpus']}", f"--num-gpus={spec.get('num_gpus', 0)}",
           f"--resources={json.dumps({name: 1})}", "--object-store-memory=200000000", "--disable-usage-stats"]
    log = log_dir / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(name, proc, temp_dir, log)


def wait_for_jobs_api(url: str, token: str, head: Node, timeout: float = 180) -> None:
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.proc.poll() is None, f"ray start exited with {head.proc.returncode}:\n{head.log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the head's job API did not come up in {timeout} s:\n{head.log.read_text()[-3000:]}")


def wait_for_nodes(cluster: Cluster, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            assert node.proc.poll() is None, f"{node.name}: ray start exited:\n{node.log.read_text()[-3000:]}"
        if len(cluster.node_ids(starting=True)) == count:
            return
        time.sleep(1)
    raise AssertionError(f"{count} nodes did not join in {timeout} s")


def stop(node: Node) -> list[str]:
    """SIGTERM to `ray start` (it stops raylet, GCS and the rest in order; SIGTERM to all of them at once
    leaves the raylet retrying a dead GCS), then SIGKILL to its process group and to any process of the
    node still running (Ray moves workers to process groups of their own); returns those left alive."""
    proc = node.proc
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    proc.terminate()
    with suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    by_dir = [p for p in psutil.process_iter(["cmdline"]) if node.temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in filter(running, {*procs, *by_dir}):
        with suppress(psutil.NoSuchProcess):
            p.kill()
    deadline = time.monotonic() + 10
    while any(running(p) for p in {*procs, *by_dir}) and time.monotonic() < deadline:
        time.sleep(0.2)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    return sorted(f"{p.pid} {p.name()}" for p in {*procs, *by_dir} if running(p))


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def runtime_env_for_test(tmp_path: Path) -> Path:
    """cluster/runtime_env.yaml without `pip`: Ray would first copy this whole virtualenv (gigabytes) to add
    packages it already has (test_runtime_env_pip_is_the_project_dependencies checks the list instead)."""
    import yaml
    from conftest import REPO

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip", None)
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path
