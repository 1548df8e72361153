"""The package's shape, as docs/architecture.md describes it: layers that never import upwards
(import-linter, configured in pyproject.toml), no branching on the task outside the tasks and the
schema, and docs that stay inside the repo."""

import re
import subprocess
import sys

from conftest import REPO


def test_import_contract_is_kept():
    """lint-imports over the package: the layer contract and no import cycle (imports inside
    functions count too)."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_a_layer_violation_would_be_caught(tmp_path):
    """The contract is not vacuous: a lower layer importing a higher one breaks it."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(REPO / "ensemblekd", copy / "ensemblekd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    store = copy / "ensemblekd" / "store.py"
    store.write_text(store.read_text() + "\n\ndef _upward():\n    from ensemblekd.stages import label  # noqa\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=copy, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(copy)})
    assert proc.returncode != 0 and "ensemblekd.store -> ensemblekd.stages" in proc.stdout, proc.stdout[-3000:]


def test_the_task_is_a_type_not_a_flag():
    """`task ==` appears only in the task implementations and the config schema."""
    found = [str(p.relative_to(REPO)) for p in (REPO / "ensemblekd").rglob("*.py") if "task ==" in p.read_text()]
    assert all(f.startswith("ensemblekd/tasks/") or f == "ensemblekd/config.py" for f in found), found


def test_nothing_in_the_repo_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pattern = re.compile(r"DESIGN\.md|REFERENCES\.md|\.\./shared|shared/")
    hits = [f for f in tracked if f.endswith((".py", ".md", ".yaml", ".toml", ".txt")) and f != "tests/unit/test_architecture.py"
            and (REPO / f).is_file() and pattern.search((REPO / f).read_text(errors="ignore"))]
    assert hits == []
