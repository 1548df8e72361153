"""The cluster files and the errors of joining one: cluster/runtime_env.yaml, aws.yaml and rayjob.yaml
checked against the project and Ray's schema, and an address where no Ray listens. The cluster itself
(several nodes, `ray job submit`, token authentication, losing a node) is test_multinode.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port
from ensemblekd.testing import tiny_config, write_config


def cli(*args, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemblekd", *map(str, args), "--no-progress"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


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
