"""Servers the tests start on 127.0.0.1 and stop by process id: moto's S3 API server and an
MLflow tracking server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port

KEY, SECRET = "ekd-test-key-id", "ekd-test-secret-not-for-mlflow"  # moto accepts any credentials


@contextmanager
def server(cmd: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None, timeout: float = 180):
    """Run a server in its own process group until the block ends; stop it (and the workers it
    spawned) by its process id. Waits until `ready_url` answers at all."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=5).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[:4]} did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.3)
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the group this server leads: only what it started
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def s3fs_client(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET, skip_instance_cache=True,
                             use_listings_cache=False)


@contextmanager
def moto_server(log_dir: Path):
    """moto's S3 server on a free port; yields its endpoint URL."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]]
    with server(cmd, endpoint, log_dir / "moto.log"):
        yield endpoint


@contextmanager
def tracking_server(tmp: Path):
    """`mlflow server` with a SQLite backend and a served artifact root; yields (URL, artifact root)."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
           "--workers", "1"]
    # no job runner: it would start eight more processes on a two-core machine, for nothing here
    with server(cmd, f"{url}/health", tmp / "server.log", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}):
        yield url, tmp / "artifacts"

