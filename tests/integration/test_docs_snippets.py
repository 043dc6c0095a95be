"""The Python snippets of the README and docs/*.md run as written, in a project whose store holds a
champion (a copy of the tiny one), from the project's directory as a user would."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from conftest import REPO

FENCED_PYTHON = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)


def python_snippets() -> list[tuple[str, str]]:
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, match in enumerate(FENCED_PYTHON.finditer(path.read_text()), start=1):
            indent = len(match.group(1))
            code = "\n".join(line[indent:] for line in match.group(2).splitlines())
            found.append((f"{path.relative_to(REPO)}#{number}", code))
    return found


SNIPPETS = python_snippets()


def test_the_docs_hold_python_snippets():
    assert [name for name, _ in SNIPPETS] == ["docs/mlflow.md#1"]  # a new one is run below as well


@pytest.mark.parametrize("name, code", SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_a_snippet_runs_as_written_in_a_project_with_a_champion(name, code, trained_project, monkeypatch):
    project = trained_project.paths.root
    (project / "mlflow.db").symlink_to(project.parent / "mlflow.db")  # the project's own store, as after dvc repro
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, name, "exec"), {"__name__": "__snippet__"})
    lines = printed.getvalue().splitlines()
    assert lines[0].split() == ["digit", "probability"], printed.getvalue()
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["0", "1", "2", "3", "4"]
    assert all(row[1] in "0123456789" and 0.0 <= float(row[2]) <= 1.0 for row in rows)
