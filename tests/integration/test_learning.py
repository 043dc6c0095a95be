"""The seed's 48/48/112 network trained on the tiny data to an accuracy well above chance: the step
schedule, one-cycle with label smoothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import SEED_WIDTHS, TINY_OVERRIDES, repo_params_raw
from mnist_cnn.core.data import load_train_val
from mnist_cnn.core.inference import loss_and_accuracy, predict_log_probs
from mnist_cnn.core.model import load_weights
from mnist_cnn.core.params import SchedulerConfig, parse_params
from mnist_cnn.stages.train import train


def test_train_learns_and_writes_weights_and_history(project, seed_params):
    step_decay = dataclasses.replace(seed_params.train, epochs=3, scheduler=SchedulerConfig("step", gamma=0.7))
    params = dataclasses.replace(seed_params, train=step_decay)
    result = train(params, project.data, project.models, project.reports, show_progress=False)
    assert [s.epoch for s in result.history] == [1, 2, 3]
    assert result.history[-1].val_acc > 80.0  # 10 classes: chance is 10%
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert [s.lr for s in result.history] == pytest.approx([0.43, 0.43 * 0.7, 0.43 * 0.49])
    history = (project.reports / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_acc,val_loss,val_acc,lr,epoch_seconds"
    assert len(history) == 4
    net = load_weights(params.model, project.models / "model.pt")  # weights_only=True inside
    _, val_data = load_train_val(project.data, "mnist", 0.2, 1, torch.device("cpu"))
    val_loss, _ = loss_and_accuracy(predict_log_probs(net, val_data.x, 500), val_data.y)
    assert val_loss == pytest.approx(result.best_val_loss, rel=1e-5)


def test_onecycle_and_label_smoothing_train(project):
    params = parse_params(
        repo_params_raw(),
        {
            **TINY_OVERRIDES,
            **SEED_WIDTHS,
            "train.scheduler": "onecycle",
            "train.label_smoothing": 0.1,
            "train.batch_size": 128,
        },
    )
    result = train(params, project.data, project.models, project.reports, show_progress=False)
    lrs = [s.lr for s in result.history]
    assert lrs[0] < params.train.lr  # one-cycle warms up from lr/25
    assert result.history[-1].val_acc > 50.0
