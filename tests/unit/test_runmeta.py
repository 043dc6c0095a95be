"""Run names, launch tags and descriptions from the environment and a run's facts (no MLflow needed)."""

from conftest import repo_params_raw
from mnist_cnn.core.params import parse_params
from mnist_cnn.tracking import runmeta

# As DVC 3.67 sets them for a stage command (checked with the real CLI: tests/test_dvc_pipeline.py).
REPRO_ENV = {"DVC_ROOT": "/repo", "DVC_STAGE": "train"}
EXP_ENV = {**REPRO_ENV, "DVC_EXP_NAME": "brisk-lamb", "DVC_EXP_BASELINE_REV": "abc"}


def test_launcher_tells_dvc_exp_run_from_dvc_repro_from_mlflow_run_from_cli():
    assert runmeta.launcher(EXP_ENV) == "dvc exp run"
    assert runmeta.launcher(REPRO_ENV) == "dvc repro"
    assert runmeta.launcher({"MLFLOW_RUN_ID": "r1"}, source_type="PROJECT") == "mlflow run"
    assert runmeta.launcher({"MLFLOW_RUN_ID": "r1"}, source_type="LOCAL") == "cli"  # a run id given by hand
    assert runmeta.launcher({}) == "cli"


def test_name_is_the_stage_and_what_differs_from_the_params_file_or_the_dvc_experiment():
    base = parse_params(repo_params_raw())
    changed = runmeta.changed_params(parse_params(repo_params_raw(), {"lr": "0.2", "train.epochs": 3}), base)
    assert changed == {"train.epochs": 3, "train.lr": 0.2}
    assert runmeta.run_name("train", changed, {}) == "train epochs=3 lr=0.2"
    optimizer = runmeta.changed_params(parse_params(repo_params_raw(), {"train.optimizer": "sgd"}), base)
    assert runmeta.run_name("all", optimizer, {}) == "all train.optimizer.name=sgd"  # no short name: dotted
    assert runmeta.run_name("all", runmeta.changed_params(base, base), {}) == "all"
    assert runmeta.run_name("train", changed, EXP_ENV) == "brisk-lamb"
    assert runmeta.run_name("train", {"train.lr": 1e-05}, {}) == "train lr=1e-05"


def test_description_says_pending_until_evaluated_then_leads_with_test_accuracy():
    facts = {
        "best_epoch": 5.0,
        "stopped_epoch": 20.0,
        "train.epochs": "50",
        "best_val_loss": 0.0301,
        "train_seconds": 247.4,
        "device": "cuda",
        "precision": "bf16",
        "git_commit": "1766d62abcdef0123",
        "git_dirty": "true",
        "launched_by": "dvc repro",
        "data.dataset": "mnist",
    }
    trained = runmeta.description(facts)
    assert trained.startswith("Test accuracy: not evaluated yet")
    assert "Best epoch 5, validation loss 0.0301; stopped after epoch 20 of 50." in trained
    assert "Trained on cuda in bf16, 247 s of training." in trained
    assert "commit 1766d62abc with uncommitted changes" in trained and "Launched by dvc repro." in trained
    evaluated = runmeta.description({**facts, "test_acc": 98.984, "test_loss": 0.0312})
    assert evaluated.startswith("**Test accuracy 98.98%** (loss 0.0312) on mnist.")
    by_accuracy = runmeta.description({**facts, "train.monitor": "val_acc", "best_val_acc": 99.25})
    assert "Best epoch 5 by validation accuracy (99.25%, loss 0.0301); stopped after epoch 20 of 50." in by_accuracy
