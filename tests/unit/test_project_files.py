"""MLproject and conda.yaml agree with params.yaml and pyproject.toml; commands find the project they run in."""

from __future__ import annotations

from conftest import REPO


def test_mlproject_parameters_are_params_yaml_keys():
    import yaml

    from conftest import REPO
    from mnist_cnn.core.params import resolve_key

    spec = yaml.safe_load((REPO / "MLproject").read_text())
    from mnist_cnn.core.search import TUNE_KEYS

    assert set(spec["entry_points"]) == {"main", "download", "train", "evaluate", "tune", "predict"}
    for entry_name, entry in spec["entry_points"].items():
        for name, declared in entry["parameters"].items():
            if name in ("params_file", "mirror", "path", "model_uri"):  # not params.yaml keys
                continue
            assert declared["default"] == "", f"{name}: defaults live in params.yaml, not MLproject"
            if entry_name == "tune":
                assert name in TUNE_KEYS and f"--tune.{name} {{{name}}}" in entry["command"]
            else:
                resolve_key(name)  # raises for a name that maps to no params.yaml key


def test_conda_yaml_pins_what_pyproject_pins():
    import tomllib
    import yaml
    from packaging.specifiers import SpecifierSet

    from conftest import REPO

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    python = pyproject["tool"]["mnist-cnn"]["python"]
    assert f"python={python}" in conda["dependencies"]
    assert len(python.split(".")) == 3, "an exact version: pyenv fetches the newest for a bare 3.11"
    assert python in SpecifierSet(pyproject["project"]["requires-python"])
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(pyproject["project"]["dependencies"])


def test_the_project_is_found_from_any_directory_inside_it_else_it_is_this_clone(tmp_path):
    from mnist_cnn.core.files import find_project

    project = tmp_path / "clone"
    (project / "reports" / "deep").mkdir(parents=True)
    (project / "params.yaml").write_text("{}\n")
    (project / "dvc.yaml").write_text("stages: {}\n")
    assert find_project(project / "reports" / "deep") == project
    assert find_project(project) == project
    (tmp_path / "elsewhere").mkdir()
    assert find_project(tmp_path / "elsewhere") == REPO  # the clone this package runs from


def test_ui_without_a_store_is_one_line_and_creates_none(tmp_path, monkeypatch, capsys):
    from mnist_cnn.cli import main

    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["ui"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'mlflow.db'}: no MLflow store yet; run the pipeline first (dvc repro)"
    )
    assert not (tmp_path / "mlflow.db").exists()
