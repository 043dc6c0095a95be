"""The package's layers, read from the code's own imports: core < ops < tracking < stages < cli, no arrow
running up, no cycle, MLflow only in tracking; every file under 400 lines; and each DVC stage's deps
list exactly the project modules the stage imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PACKAGE = SRC / "mnist_cnn"
LAYERS = ["core", "ops", "tracking", "stages"]  # each may import only itself and the layers before it
CORE_NEVER = {"mlflow", "optuna", "filelock", "psutil", "signal"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (a lazy import is still an arrow)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import {node.module}: the project imports absolutely"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def project_imports(path: Path, known: dict[str, Path]) -> set[str]:
    return {name for name in imports(path) if name in known and name != "mnist_cnn"}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def closure(start: str, known: dict[str, Path]) -> set[str]:
    """``start`` and every project module it reaches, with the packages' ``__init__`` on the way."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += project_imports(known[name], known)
        parent = name.rpartition(".")[0]
        if parent in known:
            todo.append(parent)
    return seen


def test_no_arrow_runs_up_and_core_imports_no_process_control_or_mlflow():
    known = modules()
    wrong = []
    for name, path in known.items():
        mine = layer(name)
        if mine is None:
            continue
        allowed = LAYERS[: LAYERS.index(mine) + 1]
        for target in project_imports(path, known):
            if layer(target) not in allowed:
                wrong.append(f"{name} -> {target}")
        outside = {imported.split(".")[0] for imported in imports(path)}
        if mine == "core" and outside & CORE_NEVER:
            wrong.append(f"{name} imports {sorted(outside & CORE_NEVER)}")
        if mine != "tracking" and "mlflow" in outside:
            wrong.append(f"{name} imports mlflow (only mnist_cnn.tracking may)")
    assert not wrong, "arrows against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    known = modules()
    graph = {name: project_imports(path, known) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_file_is_under_the_line_limit():
    long = {
        str(path.relative_to(REPO)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def dvc_stages() -> dict[str, dict]:
    stages = {}
    for dvc_file in (REPO / "dvc.yaml", REPO / "tune" / "dvc.yaml"):
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            stages[f"{dvc_file.relative_to(REPO)}:{name}"] = stage | {"_dir": dvc_file.parent / stage.get("wdir", ".")}
    return stages


@pytest.mark.parametrize("stage_id", sorted(dvc_stages()))
def test_a_stage_lists_exactly_the_project_modules_it_imports(stage_id):
    """Derived from the stage module's imports (``python -m mnist_cnn STAGE`` runs ``stages/STAGE.py``;
    ``cli.py`` only dispatches to it). A listed directory covers every module below it."""
    stage = dvc_stages()[stage_id]
    command = stage["cmd"].split()
    assert command[:3] == ["python", "-m", "mnist_cnn"], stage["cmd"]
    known = modules()
    used = {known[name].resolve() for name in closure(f"mnist_cnn.stages.{command[3]}", known)}
    deps = [(stage["_dir"] / dep).resolve() for dep in stage.get("deps", []) if str(dep).startswith(("src", "../src"))]
    folders = [dep for dep in deps if dep.is_dir()]
    listed = {dep for dep in deps if dep.suffix == ".py"}
    missing = sorted(str(p.relative_to(REPO)) for p in used - listed if not any(f in p.parents for f in folders))
    extra = sorted(str(p.relative_to(REPO)) for p in listed - used)
    assert not missing, f"{stage_id}: deps miss modules the stage imports: {missing}"
    assert not extra, f"{stage_id}: deps list modules the stage never imports: {extra}"
