"""The package's shape, as docs/architecture.md describes it: layers that never import upwards
(import-linter, configured in pyproject.toml), no branching on the task outside the tasks and the
schema, and docs that stay inside the repo."""

import re
import subprocess
import sys

import pytest

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


def test_the_package_type_checks():
    """mypy over the package ([tool.mypy] in pyproject.toml: the annotated functions are checked)."""
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


EXTENSION_POINTS = {"task", "strategy", "kind", "loss", "weighting"}
# Each extension point may name its own members inside its own package.
EXTENSION_PACKAGES = ("ensemblekd/tasks/", "ensemblekd/teachers/", "ensemblekd/mixing/", "ensemblekd/losses.py")


def literal_dispatch(source: str) -> list[tuple[int, str]]:
    """(line, code) of each comparison of a task, strategy, kind, loss or weighting (a name, an
    attribute or a ["key"]) with a string literal or a collection of them."""
    import ast

    def named(node) -> str | None:
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            return node.slice.value
        return None

    def literal(node) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return bool(node.elts) and all(literal(e) for e in node.elts)
        return isinstance(node, ast.Constant) and isinstance(node.value, str)

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if {named(s) for s in sides} & EXTENSION_POINTS and any(literal(s) for s in sides):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_stage_branches_on_an_extension_by_name():
    """Outside an extension point's own package, no module compares a task, strategy, teacher kind,
    loss or weighting rule to a literal name: it asks the registered class (an AST check)."""
    found = [(str(p.relative_to(REPO)), line, code) for p in sorted((REPO / "ensemblekd").rglob("*.py"))
             if not str(p.relative_to(REPO)).startswith(EXTENSION_PACKAGES)
             for line, code in literal_dispatch(p.read_text())]
    assert found == []


@pytest.mark.parametrize("code", ["if cfg.distill.strategy == 'born_again': pass",
                                  "x = store.manifest['task'] in ('token', 'text')",
                                  "ok = t.kind != \"gguf\""])
def test_the_dispatch_check_is_not_vacuous(code):
    assert literal_dispatch(code)


def test_nothing_in_the_repo_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pattern = re.compile(r"DESIGN\.md|REFERENCES\.md|\.\./shared|shared/")
    hits = [f for f in tracked if f.endswith((".py", ".md", ".yaml", ".toml", ".txt")) and f != "tests/unit/test_architecture.py"
            and (REPO / f).is_file() and pattern.search((REPO / f).read_text(errors="ignore"))]
    assert hits == []


@pytest.mark.parametrize("section, cls", [("### Adding a task", "ensemblekd.tasks.base:Task"),
                                          ("### Adding a teacher kind", "ensemblekd.teachers.base:TeacherKind")])
def test_the_extension_recipe_names_every_method(section, cls):
    """docs/architecture.md's recipe for a task and a teacher kind names each public method of the
    base class, as `name(`, and each class it declares (its Options), as `Name`, in its own section."""
    from ensemblekd.plugins import import_callable

    doc = (REPO / "docs" / "architecture.md").read_text()
    text = doc[doc.index(section):]
    text = text[:text.index("\n### ", 1)]
    base = import_callable(cls, "test")
    methods = [n for n, v in vars(base).items() if callable(v) and not n.startswith("_")]
    assert methods and [n for n in methods if f"`{n}{'' if isinstance(vars(base)[n], type) else '('}" not in text] == []
