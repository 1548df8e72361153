"""MLflow run status: KILLED for Ctrl-C, SIGTERM and processes killed outright, FAILED for errors."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from ensemblekd import cli, tracking
from ensemblekd.config import parse_config
from ensemblekd.testing import tiny_config

# A child process that opens a run, prints its id and its experiment's, then waits to be signalled.
CHILD = """
import json, sys, time
from ensemblekd import tracking
from ensemblekd.config import parse_config

cfg = parse_config(json.loads(sys.argv[1]))
try:
    with tracking.mlflow_run(cfg, "distill") as info:
        print(info["run_id"], info["experiment_id"], flush=True)
        time.sleep(120)
except KeyboardInterrupt:
    sys.exit(143)
"""


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # mlflow_run sets it: undone after
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield parse_config(tiny_config(tmp_path, tmp_path))
    mlflow.set_tracking_uri(None)


def _client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.uri)


def _status(cfg, run_id: str) -> str:
    return _client(cfg).get_run(run_id).info.status


def _child(cfg) -> tuple[subprocess.Popen, str, str]:
    """A child inside mlflow_run, once its run is open: the process, its run id, its experiment id."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg.to_dict())], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.kill()
        pytest.fail(f"the child did not open a run: {proc.communicate(timeout=30)[1]}")
    return proc, line[0], line[1]


def test_a_killed_process_run_ends_killed_on_next_start_others_untouched(cfg):
    proc, orphan, experiment_id = _child(cfg)
    proc.kill()
    proc.wait(timeout=30)
    assert _status(cfg, orphan) == "RUNNING"
    client = _client(cfg)
    host = socket.gethostname()
    live = client.create_run(experiment_id, tags={tracking.HOST_TAG: host, tracking.PID_TAG: str(os.getpid())})
    elsewhere = client.create_run(experiment_id, tags={tracking.HOST_TAG: host + "-other", tracking.PID_TAG: str(proc.pid)})

    with tracking.mlflow_run(cfg, "distill") as info:
        assert _status(cfg, orphan) == "KILLED"
        assert client.get_run(orphan).info.end_time
        tags = client.get_run(info["run_id"]).data.tags
        assert (tags[tracking.HOST_TAG], tags[tracking.PID_TAG]) == (host, str(os.getpid()))
    assert _status(cfg, info["run_id"]) == "FINISHED"
    assert _status(cfg, live.info.run_id) == "RUNNING"       # a live pid: maybe a run in progress
    assert _status(cfg, elsewhere.info.run_id) == "RUNNING"  # another host's pid means nothing here


def test_a_failing_search_never_stops_the_new_run(cfg, monkeypatch, capsys):
    from mlflow import MlflowClient

    def unavailable(*args, **kwargs):
        raise ConnectionError("tracking server restarting")

    monkeypatch.setattr(MlflowClient, "search_runs", unavailable)
    with tracking.mlflow_run(cfg, "distill") as info:
        pass
    assert _status(cfg, info["run_id"]) == "FINISHED"
    assert capsys.readouterr() == ("", "")


def test_sigterm_ends_the_run_killed_without_a_traceback(cfg):
    proc, run_id, _ = _child(cfg)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "Traceback" not in stderr
    assert _status(cfg, run_id) == "KILLED"


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (tracking.Terminated, "KILLED"),
                                           (SystemExit(signal.SIGTERM), "KILLED"), (ValueError, "FAILED")])
def test_interrupts_end_killed_errors_failed(cfg, error, status):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(BaseException) as raised:
        with tracking.mlflow_run(cfg, "evaluate") as info:
            assert signal.getsignal(signal.SIGTERM) is not before
            raise error
    assert isinstance(raised.value, error if isinstance(error, type) else type(error))
    assert _status(cfg, info["run_id"]) == status
    assert signal.getsignal(signal.SIGTERM) is before


def test_nested_runs_end_killed_too(cfg):
    with pytest.raises(KeyboardInterrupt):
        with tracking.mlflow_run(cfg, "distill") as info, tracking.nested_run(info, "level_0", {}) as child:
            raise KeyboardInterrupt
    assert _status(cfg, child["run_id"]) == _status(cfg, info["run_id"]) == "KILLED"
    assert _client(cfg).get_run(child["run_id"]).data.tags[tracking.PID_TAG] == str(os.getpid())


@pytest.mark.parametrize("error, code, word", [(KeyboardInterrupt, 130, "interrupted"), (tracking.Terminated, 143, "terminated"),
                                               (SystemExit(signal.SIGTERM), 143, "terminated")])
def test_cli_stops_in_one_line(monkeypatch, capsys, error, code, word):
    def command(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "compare", command)
    assert cli.main(["compare", "--experiment", "x"]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"ensemblekd: {word};") and err.count("\n") == 1


def test_cli_keeps_other_exits(monkeypatch):
    def command(args):
        raise SystemExit(3)

    monkeypatch.setitem(cli.COMMANDS, "compare", command)
    with pytest.raises(SystemExit) as raised:
        cli.main(["compare", "--experiment", "x"])
    assert raised.value.code == 3
