"""MLflow against a real SQLite store in the test's tmp dir: one run per training, across stages."""

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import only_run, write_tiny_params
from mnist_cnn.cli import main
from mnist_cnn.core.data import load_split
from mnist_cnn.core.params import load_params
from mnist_cnn.core.selection import Scored
from mnist_cnn.stages import evaluate, train
from mnist_cnn.tracking import registry, store

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds")


def test_train_then_evaluate_is_one_finished_run_with_everything(trained_project):
    """The champion's training (train.run_train, then evaluate.run_evaluate, with the seed's network),
    a copy of its project and store."""
    project, run_id, result, evaluation = (
        trained_project.paths,
        trained_project.run_id,
        trained_project.result,
        trained_project.evaluation,
    )
    assert trained_project.trained_run.info.status == "FINISHED"  # as train left it
    assert trained_project.eval_run_id == run_id
    run = only_run()
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    client = MlflowClient()

    params = run.data.params
    assert params["train.lr"] == "0.43" and params["model.hidden_3"] == "112"
    assert params["data.dataset"] == "mnist" and params["evaluate.batch_size"] == "500"
    assert params["device"] == "cpu" and params["precision"] == "fp32"

    for key in EPOCH_METRICS:
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert client.get_metric_history(run_id, "val_loss")[0].value == pytest.approx(result.history[0].val_loss)
    metrics = run.data.metrics
    assert metrics["test_acc"] == evaluation.metrics["test"]["accuracy"]
    assert metrics["final_train_loss"] == evaluation.metrics["train"]["loss"]
    assert metrics["best_epoch"] == result.best_epoch and metrics["stopped_epoch"] == 2
    assert metrics["best_val_acc"] == pytest.approx(result.best_val_acc)
    assert (metrics["data.train_images"], metrics["data.test_images"], metrics["data.test_duplicates"]) == (
        1500,
        297,
        0,
    )
    checked = [d for d in run.inputs.dataset_inputs if any(t.key == "checks" for t in d.tags)]
    assert len(checked) == 2  # training and validation carry the checks' results
    assert {t.key: t.value for t in checked[0].tags}["test_duplicates"] == "0"
    info = json.loads((project.models / "train.json").read_text())
    assert (info["monitor"], info["best_val_acc"]) == ("val_loss", pytest.approx(result.best_val_acc))

    tags = run.data.tags
    assert tags["dataset"] == "mnist" and "git_commit" in tags and "git_dirty" in tags
    assert len([t for t in tags if t.startswith("data_md5.")]) == 4

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {
        "confusion_matrix.png",
        "confusion_matrix.json",
        "learning_curves.png",
        "classification_report.txt",
        "params.yaml",
    } <= artifacts
    confusion = mlflow.artifacts.load_dict(f"runs:/{run_id}/confusion_matrix.json")
    assert np.array(confusion["counts"]).sum() == 297
    assert np.allclose(np.array(confusion["normalized"]).sum(axis=1)[np.array(confusion["counts"]).sum(axis=1) > 0], 1)

    version = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert str(version.version) == "1" and version.run_id == run_id
    card = mlflow.artifacts.load_text(f"runs:/{run_id}/model_card.md")
    assert version.description == card and card.startswith("# mnist-cnn v1\n")
    assert "promoted: no champion yet" in card.splitlines() and "## Intended use and limits" in card
    assert f"Test accuracy **{evaluation.metrics['test']['accuracy']:.2f}%**" in card


def test_registered_champion_predicts_digits_from_raw_pixels(trained_project):
    evaluation = trained_project.evaluation
    store.configure()
    model = mlflow.pyfunc.load_model("models:/mnist-cnn@champion")
    test_split = load_split(trained_project.paths.data, train=False)
    pixels = test_split.images.numpy().astype(np.float32)  # 0-255, not normalised
    assert pixels.max() == 255.0
    answer = model.predict(pixels)
    assert list(answer.columns) == ["digit", "probability", *(f"p{k}" for k in range(10))]
    assert len(answer) == 297
    assert np.array_equal(answer["digit"].to_numpy(), evaluation.predicted)  # same digits as the evaluate stage
    probabilities = answer[[f"p{k}" for k in range(10)]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(answer["probability"].to_numpy(), probabilities.max(axis=1))
    signature = model.metadata.signature
    assert signature.inputs is None  # the model checks its input forms itself (core/payload.py)
    assert signature.outputs.input_names() == list(answer.columns)
    assert [p.name for p in signature.params.params] == ["preprocess"]
    assert set(model.metadata.metadata["input_forms"]) == {"pixels", "uint8_base64", "png_base64"}


def answers(right: int, total: int = 300, flip: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``right`` of ``total`` validation images right (the first ones); then ``flip`` = (newly right,
    newly wrong): the next images turned right and the first ones turned wrong."""
    correct = np.arange(total) < right
    gained, lost = flip
    correct[right : right + gained] = True
    correct[:lost] = False
    return correct


def test_the_champion_moves_only_on_a_significant_win_on_the_same_validation_images(mlflow_store, tmp_path, capsys):
    store.configure()
    client = MlflowClient()
    client.create_registered_model("m")
    with mlflow.start_run() as run:
        mlflow.log_text("x", "model/MLmodel")
    for _ in range(5):
        client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)

    def challenge(version: str, correct: np.ndarray, split: str = "split-a", test_acc: float = 99.0):
        return registry.promote_on_validation("m", Scored(version, split, correct), test_acc, alpha=0.05)

    first = challenge("1", answers(270))
    assert first.promote and first.reason == "no champion yet"
    # One more image right (and a higher test accuracy): a lead of one digit is not evidence.
    lead = challenge("2", answers(270, flip=(1, 0)), test_acc=99.9)
    assert not lead.promote and (lead.only_challenger, lead.only_champion, lead.p_value) == (1, 0, 0.5)
    assert lead.reason == (
        "validation 90.33% vs champion v1 90.00% on the same 300 images; right where v1 was wrong: 1, wrong where"
        " it was right: 0; McNemar p = 0.5 >= 0.05"
    )
    other_split = challenge("3", answers(299), split="split-b")
    assert not other_split.promote and "scored on other validation images" in other_split.reason
    win = challenge("4", answers(270, flip=(20, 2)))
    assert win.promote and (win.only_challenger, win.only_champion) == (20, 2) and win.p_value < 1e-4
    assert str(client.get_model_version_by_alias("m", "champion").version) == "4"

    tags = client.get_model_version("m", "4").tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_before"] == "1"
    assert float(tags["promotion.p_value"]) == pytest.approx(win.p_value, rel=1e-5)
    assert tags["selection.val_acc"] == "96.0000" and tags["test_acc"] == "99.0000"
    assert np.array_equal(registry.scored_version(client, "m", "4").correct, answers(270, flip=(20, 2)))
    assert client.get_model_version("m", "2").tags["promotion.decision"] == "kept"

    # By hand, with who and why; the rule's record stays on the other versions.
    params_file = write_tiny_params(tmp_path / "params.yaml", **{"mlflow.registered_model": "m"})
    assert main(["promote", "2", "--force", "--reason", "a hand pick", "--params", str(params_file)]) == 0
    assert capsys.readouterr().out == "m v2 is now @champion (was v4)\n"
    tags = client.get_model_version("m", "2").tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_before"] == "4"
    assert tags["promotion.reason"].startswith("forced by ") and tags["promotion.reason"].endswith(": a hand pick")
    assert main(["promote", "9", "--force", "--params", str(params_file)]) == 1
    assert capsys.readouterr().err.startswith("error: 'm' has no version 9 in ")

    # A champion registered before versions kept their validation answers is never compared with.
    client.delete_model_version_tag("m", "2", "selection.correct")
    legacy = challenge("5", answers(300))
    assert not legacy.promote and legacy.reason == (
        "champion v2 has no validation record (registered before selection on validation): not compared"
    )


def test_another_seed_of_the_same_recipe_and_a_worse_model_do_not_take_the_alias(trained_project):
    """Two real trainings in the champion's project: the same recipe with another seed (a different model,
    as good within noise) and a clearly worse one (one epoch at a tenth of the learning rate)."""
    paths = trained_project.paths
    client = MlflowClient()
    for overrides in ({"train.seed": "2"}, {"train.epochs": "1", "train.lr": "0.043"}):
        params = load_params(paths.params_file, overrides)
        train.run_train(params, paths, show_progress=False)
        evaluate.run_evaluate(params, paths)
    versions = {str(v.version): v.tags for v in client.search_model_versions("name = 'mnist-cnn'")}
    assert sorted(versions) == ["1", "2", "3"]
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "1"
    for version in ("2", "3"):
        tags = versions[version]
        assert tags["promotion.decision"] == "kept" and tags["promotion.champion_before"] == "1", tags
        assert float(tags["promotion.p_value"]) >= 0.05
        assert tags["selection.split"] == versions["1"]["selection.split"]  # the same validation images
    assert float(versions["3"]["selection.val_acc"]) < float(versions["1"]["selection.val_acc"])
    assert float(versions["3"]["promotion.p_value"]) > 0.9  # far worse: no sign of being better


def test_crash_ends_the_run_failed(project, tiny_params, monkeypatch):
    def crashed(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(train, "train", crashed)
    with pytest.raises(RuntimeError, match="out of memory"):
        train.run_train(tiny_params, project, show_progress=False)
    assert only_run().info.status == "FAILED"
    assert not (project.models / "model.pt").exists()


def test_interrupt_ends_the_run_killed(project, tiny_params, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run_train(tiny_params, project, show_progress=False)
    assert only_run().info.status == "KILLED"


def test_mlflow_run_id_from_environment_is_reused(project, tiny_params, monkeypatch):
    store.configure()
    experiment_id = store.experiment_id("mnist-cnn")
    created = MlflowClient().create_run(experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    run_id, _ = train.run_train(tiny_params, project, show_progress=False)
    assert run_id == created.info.run_id
    assert only_run().info.run_id == created.info.run_id


def test_param_already_logged_by_mlflow_run_is_not_a_clash(project, tiny_params, monkeypatch):
    store.configure()
    created = MlflowClient().create_run(store.experiment_id("mnist-cnn"))
    MlflowClient().log_param(created.info.run_id, "train.epochs", "2")  # as `mlflow run -P train.epochs=2` does
    MlflowClient().log_param(created.info.run_id, "epochs", "''")
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    train.run_train(tiny_params, project, show_progress=False)
    assert only_run().data.params["train.epochs"] == "2"


def test_run_is_named_described_lists_its_datasets_and_samples_system_metrics(named_run):
    """``train --lr 0.2`` then ``evaluate`` (tests/conftest.py: named_run, read where it is)."""
    from mnist_cnn.core.data import split_digests, verified_md5s

    project, params, run_id, result = named_run.paths, named_run.params, named_run.run_id, named_run.result
    client = MlflowClient(named_run.uri, named_run.uri)
    trained = named_run.trained_run  # as train left it
    assert trained.info.run_name == "train lr=0.2"
    assert trained.data.tags["launched_by"] == "cli"
    assert trained.data.tags["mlflow.note.content"].startswith("Test accuracy: not evaluated yet")
    system = {key for key in trained.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system

    evaluation = named_run.evaluation
    run = client.get_run(run_id)
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith(f"**Test accuracy {evaluation.metrics['test']['accuracy']:.2f}%**")
    assert f"stopped after epoch {result.stopped_epoch} of 2" in description and "on cpu in fp32" in description

    digests = split_digests(verified_md5s(project.data, "mnist"), params.train.val_split, params.train.seed)
    logged = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs
    }
    assert set(logged) == {"training", "validation", "test"}
    for context, dataset in logged.items():
        assert dataset.name == "mnist" and dataset.digest == digests[context]
        assert str(project.data.resolve()) in dataset.source
    assert len(set(digests.values())) == 3  # the validation cut is another dataset than the training part

    assert "confident_mistakes.png" in {a.path for a in client.list_artifacts(run_id)}
    assert (project.reports / "confident_mistakes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_listing_runs_names_the_store_it_read(project, capsys):
    """On a local SQLite store ``runs`` also creates the experiment (no owners there; it keeps parallel
    ``mlflow run`` from racing in MLflow's experiment creation). On a team server it never does:
    tests/e2e/test_server.py."""
    from mnist_cnn.cli import main

    assert main(["runs", "--params", str(project.params_file), "--root", str(project.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"MLflow store: {mlflow.get_tracking_uri()}", "0 RUNNING run(s) in experiment 'mnist-cnn'"]
    assert mlflow.get_experiment_by_name("mnist-cnn").artifact_location == (project.root / "mlartifacts").as_uri()
