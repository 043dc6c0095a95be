"""Settings chosen by name (train.optimizer, train.scheduler, tune.pruner) take only the keys that act
under that name: what would be ignored cannot be written, logged or fingerprinted. Old flat params.yaml
files still load; overrides reach nested keys; MLproject passes any params.yaml key through."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import REPO, repo_params_raw
from mnist_cnn.cli import build_parser, main, parse_overrides
from mnist_cnn.core.checkpoint import training_fingerprint
from mnist_cnn.core.params import (
    ConfigError,
    OptimizerConfig,
    SchedulerConfig,
    flatten,
    load_params,
    parse_params,
    with_values,
    yaml_load,
)
from mnist_cnn.core.search import PrunerConfig, load_tune, parse_tune
from mnist_cnn.stages.tune import make_pruner

# params.yaml as it was before the settings were nested (`git show 1be09eb:params.yaml`), verbatim.
OLD_PARAMS_YAML = """\
# The one source of defaults. One section per stage; dvc.yaml lists, per stage, only the keys it reads.
# Values under model/train/evaluate are the seed's (pytorch/examples-style MNIST CNN).
data:
  dataset: mnist            # mnist | fashion-mnist

model:
  hidden_1: 48              # channels of the first conv
  hidden_2: 48              # channels of the second conv
  hidden_3: 112             # units of the hidden linear layer
  dropout1: 0.0             # after max-pool
  dropout2: 0.17            # after the hidden linear layer
  batchnorm: false          # BatchNorm2d after each conv (the augmented preset's one change)
  padding: 0                # zero padding of each conv, pixels: 0 (the seed's, fc1 takes 48*12*12) | 1 (3x3: 48*14*14)
  kernel_size: 3            # both convs' kernel: 3 (the seed's) | 5 (unpadded, fc1 takes 48*10*10)
  dilation: 1               # conv2's dilation: 1 (the seed's) | 2 (taps 2 px apart; unpadded 3x3, fc1 48*11*11)

train:
  batch_size: 64
  epochs: 50
  optimizer: adadelta       # adadelta (pytorch/examples) | adamw | sgd (Nesterov, momentum 0.9)
  lr: 0.43
  weight_decay: 0.01        # adamw's decoupled weight decay (torch's default); adadelta and sgd use none
  scheduler: step           # step | plateau | onecycle | constant (README: Learning-rate schedule)
  lr_gamma: 0.7             # lr factor: every epoch (step, pytorch/examples' 0.7) or per stall (plateau)
  lr_patience: 2            # plateau: lr *= lr_gamma once more than this many epochs are no better
  label_smoothing: 0.0
  val_split: 0.2
  patience: 15              # epochs without a better `monitor` value before stopping
  monitor: val_loss         # val_loss | val_acc (ties: the lower loss): picks the kept weights and stops early
  seed: 1
  device: auto              # auto (cuda > mps > cpu) | cpu | cuda | mps
  precision: auto           # auto | fp32 | bf16 | fp16 (fp16: CUDA only)
  compile: none             # none | default | reduce-overhead (torch.compile with CUDA graphs)
  resume: auto              # auto: an interrupted training continues from models/checkpoint.pt | never
  # Augmentation of each training batch (validation and test never): 0 turns each one off.
  augment_shift: 0          # random shift, up to this many pixels
  augment_rotate: 0         # random rotation, up to this many degrees
  augment_scale: 0          # random scale in [1 - x, 1 + x]
  augment_shear: 0          # random horizontal shear, up to this many degrees
  augment_erase: 0          # probability of blanking a random box (2-33% of the image) in each image
  augment_elastic: 0        # elastic warp's strength alpha, pixels (Simard et al. 2003 use 34)
  augment_elastic_sigma: 4  # its smoothness: Gaussian sigma, pixels
  augment_clean_epochs: 0   # the last this many of `epochs` train on clean batches (the test's distribution)
  ema_decay: 0              # > 0: validate and keep an exponential moving average of the weights
  processes: 1              # > 1: train with DistributedDataParallel, launched through torchrun

evaluate:
  batch_size: 1000          # the seed's test_batch_size
  tta: false                # true: score the image and its four 1-pixel shifts, probabilities averaged

mlflow:
  experiment: mnist-cnn
  registered_model: mnist-cnn
  preset: ""                # a name for the tag `preset` on training runs (README: Accuracy presets)

# The tune stage (tune/dvc.yaml: `dvc repro tune/dvc.yaml`, never part of a plain `dvc repro`): an Optuna
# study over `space`, every trial a real training of `epochs` epochs, pruned early when hopeless.
tune:
  study_name: mnist-cnn
  storage: tune/study.journal   # a journal file (one machine or NFS), or a database URL shared by workers
  n_trials: 40                  # the study's total, over all workers
  timeout: null                 # seconds per worker, or null for no limit
  sampler_seed: 1               # TPE's seed (a second worker of the study uses seed + 1, ...)
  pruner: median                # median | hyperband | none
  pruner_startup_trials: 5      # median: trials finished before any is pruned
  pruner_warmup_epochs: 1       # median: epochs a trial runs before it can be pruned
  epochs: 5                     # train.epochs of each trial (early epochs rank the configurations)
  space:                        # params.yaml keys: a range (log: true for a log scale) or choices
    train.lr: {low: 0.05, high: 2.0, log: true}
    model.dropout1: {low: 0.0, high: 0.5}
    model.dropout2: {low: 0.0, high: 0.5}
    model.hidden_1: {low: 16, high: 64, log: true}
    model.hidden_2: {low: 16, high: 64, log: true}
    model.hidden_3: {low: 64, high: 256, log: true}
    train.batch_size: {choices: [32, 64, 128, 256]}
"""


def params_with(**train_and_tune) -> dict:
    """params.yaml's values with ``train.KEY`` / ``tune.KEY`` (dotted keyword names use __) replaced."""
    raw = repo_params_raw()
    for key, value in train_and_tune.items():
        section, name = key.split("__")
        raw[section][name] = value
    return raw


def test_the_default_settings_are_nested_and_flatten_to_what_acts():
    params = load_params(REPO / "params.yaml")
    assert params.train.optimizer == OptimizerConfig("adadelta") and params.train.optimizer.weight_decay is None
    assert params.train.scheduler == SchedulerConfig("step", gamma=0.7) and params.train.scheduler.patience is None
    flat = flatten(params)
    settings = {k: v for k, v in flat.items() if k.startswith(("train.optimizer", "train.scheduler"))}
    assert settings == {
        "train.optimizer.name": "adadelta",
        "train.scheduler.name": "step",
        "train.scheduler.gamma": 0.7,
    }
    assert not any(k.endswith(("weight_decay", "lr_gamma", "lr_patience", "patience_")) for k in flat)
    assert load_tune(REPO / "params.yaml", params).pruner == PrunerConfig("median", startup_trials=5, warmup_epochs=1)


@pytest.mark.parametrize(
    ("section", "setting", "message"),
    [
        (
            "train",
            {"optimizer": {"name": "adadelta", "weight_decay": 0.01}},
            "train.optimizer.weight_decay = 0.01: adadelta takes no weight_decay (adamw does);"
            " allowed under adadelta: name",
        ),
        (
            "train",
            {"optimizer": {"name": "sgd", "momentum": 0.9}},
            "train.optimizer.momentum = 0.9: sgd takes no momentum; allowed under sgd: name",
        ),
        (
            "train",
            {"scheduler": {"name": "onecycle", "gamma": 0.7}},
            "train.scheduler.gamma = 0.7: onecycle takes no gamma (step and plateau do); allowed under onecycle: name",
        ),
        (
            "train",
            {"scheduler": {"name": "step", "gamma": 0.7, "patience": 2}},
            "train.scheduler.patience = 2: step takes no patience (plateau does); allowed under step: name, gamma",
        ),
        ("train", {"scheduler": {"gamma": 0.7}}, "train.scheduler.name: missing key"),
        (
            "train",
            {"scheduler": "cosine"},
            "train.scheduler.name = 'cosine': expected step | plateau | onecycle | constant",
        ),
        (
            "train",
            {"scheduler": {"name": "plateau", "patience": -1}},
            "train.scheduler.patience = -1: expected an integer >= 0",
        ),
        (
            "train",
            {"scheduler": {"name": "plateau", "gamma": "0.5"}},
            "train.scheduler.gamma = '0.5': expected a number",
        ),
        (
            "train",
            {"optimizer": {"name": "adamw", "weight_decay": 1.5}},
            "train.optimizer.weight_decay = 1.5: expected a number in [0, 1)",
        ),
    ],
)
def test_a_key_that_does_not_act_or_is_out_of_range_is_refused(section, setting, message):
    raw = repo_params_raw()
    raw[section].update(setting)
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value) == message


def test_the_cli_refuses_an_ignored_key_in_one_line_with_exit_2(tmp_path: Path, capsys):
    params = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    params.write_text(text.replace("    name: adadelta ", "    weight_decay: 0.01\n    name: adadelta "))
    assert main(["train", "--params", str(params), "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {params}: train.optimizer.weight_decay = 0.01: adadelta takes no weight_decay (adamw does);"
        " allowed under adadelta: name"
    )
    assert not (tmp_path / "models").exists()


def test_the_pruners_keys_act_under_median_alone():
    raw = repo_params_raw()
    params = parse_params(raw)
    raw["tune"]["pruner"] = {"name": "hyperband", "startup_trials": 5}
    with pytest.raises(ConfigError) as caught:
        parse_tune(raw["tune"], params)
    expected = (
        "tune.pruner.startup_trials = 5: hyperband takes no startup_trials (median does); allowed under hyperband: name"
    )
    assert str(caught.value) == expected
    median = make_pruner(parse_tune({**raw["tune"], "pruner": {"name": "median", "warmup_epochs": 3}}, params))
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert (median._n_startup_trials, median._n_warmup_steps) == (5, 3)  # the one not given: its default
    assert isinstance(
        make_pruner(parse_tune({**raw["tune"], "pruner": "hyperband"}, params)), optuna.pruners.HyperbandPruner
    )
    assert isinstance(make_pruner(parse_tune({**raw["tune"], "pruner": "none"}, params)), optuna.pruners.NopPruner)


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("adamw", OptimizerConfig("adamw", weight_decay=0.01)),
        ({"name": "adamw"}, OptimizerConfig("adamw", weight_decay=0.01)),
        ("sgd", OptimizerConfig("sgd")),
        ("plateau", SchedulerConfig("plateau", gamma=0.7, patience=2)),
        ({"name": "plateau", "patience": 4}, SchedulerConfig("plateau", gamma=0.7, patience=4)),
        ({"name": "step"}, SchedulerConfig("step", gamma=0.7)),
        ("onecycle", SchedulerConfig("onecycle")),
        ("median", PrunerConfig("median", startup_trials=5, warmup_epochs=1)),
    ],
)
def test_a_bare_name_or_missing_keys_take_the_defaults(written, read):
    assert type(read).parse(written) == read
    assert type(read).parse(read.as_raw()) == read


def test_overrides_take_a_bare_name_or_reach_nested_keys(caplog):
    raw = repo_params_raw()
    cli = parse_overrides(["--train.optimizer", "adamw", "--train.scheduler.gamma", "0.5", "train.seed=3"])
    params = parse_params(raw, cli)
    assert params.train.optimizer == OptimizerConfig("adamw", weight_decay=0.01)
    assert params.train.scheduler == SchedulerConfig("step", gamma=0.5) and params.train.seed == 3
    both = parse_params(raw, {"train.optimizer.name": "adamw", "train.optimizer.weight_decay": "0.05"})
    assert both.train.optimizer == OptimizerConfig("adamw", weight_decay=0.05)
    whole = parse_params(raw, {"train.scheduler": "{name: plateau, patience: 3}"})
    assert whole.train.scheduler == SchedulerConfig("plateau", gamma=0.7, patience=3)
    with caplog.at_level(logging.WARNING):  # step's gamma acts under plateau too: kept, nothing said
        assert parse_params(raw, {"train.scheduler": "plateau", "train.scheduler.gamma": 0.5}).train.scheduler == (
            SchedulerConfig("plateau", gamma=0.5, patience=2)
        )
    assert not caplog.records
    with pytest.raises(ConfigError, match=r"^train\.optimizer\.weight_decay = 0\.1: adadelta takes no weight_decay"):
        parse_params(raw, {"train.optimizer.weight_decay": "0.1"})  # under the file's adadelta
    with pytest.raises(ConfigError, match=r"^train\.optimizer\.name = 'adam': expected adadelta \| adamw \| sgd$"):
        parse_params(raw, {"train.optimizer": "adam"})


def test_an_override_that_changes_the_name_drops_the_files_keys_that_no_longer_act(tmp_path, caplog):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_with(train__optimizer={"name": "adamw", "weight_decay": 0.05})))
    with caplog.at_level(logging.WARNING):
        params = load_params(path, {"train.optimizer": "sgd", "train.scheduler": "onecycle"})
    assert params.train.optimizer == OptimizerConfig("sgd") and params.train.scheduler == SchedulerConfig("onecycle")
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: train.optimizer.weight_decay = 0.05 dropped: sgd, chosen by an override, takes no weight_decay",
        f"{path}: train.scheduler.gamma = 0.7 dropped: onecycle, chosen by an override, takes no gamma",
    ]
    # A key the override itself gives is never dropped: refused where it does not act.
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.scheduler\.gamma = 0\.5: onecycle takes no gamma"):
        load_params(path, {"train.scheduler": "onecycle", "train.scheduler.gamma": "0.5"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tune = load_tune(path, params, {"tune.pruner": "none"})
    assert tune.pruner == PrunerConfig("none")
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: tune.pruner.startup_trials = 5, tune.pruner.warmup_epochs = 1 dropped: none, chosen by an"
        " override, takes no startup_trials, warmup_epochs"
    ]
    assert load_tune(path, params, {"tune.pruner.startup_trials": "2"}).pruner.startup_trials == 2


@pytest.mark.parametrize(
    ("key", "now"),
    [
        ("train.weight_decay", "train.optimizer.weight_decay"),
        ("train.lr_gamma", "train.scheduler.gamma"),
        ("train.lr_patience", "train.scheduler.patience"),
    ],
)
def test_an_old_flat_key_as_an_override_says_where_it_went(key, now):
    with pytest.raises(ConfigError) as caught:
        parse_params(repo_params_raw(), {key: "0.5"})
    assert str(caught.value) == f"{key}: unknown parameter (now {now}, where it acts)"


def test_an_old_flat_tune_key_as_an_override_says_where_it_went():
    raw = repo_params_raw()
    with pytest.raises(
        ConfigError, match=r"^tune\.pruner_warmup_epochs: unknown parameter \(now tune\.pruner\.warmup_epochs"
    ):
        parse_tune(raw["tune"], parse_params(raw), {"tune.pruner_warmup_epochs": "2"})


def test_the_old_flat_params_yaml_loads_to_the_same_values(tmp_path, caplog):
    old = tmp_path / "params.yaml"
    old.write_text(OLD_PARAMS_YAML)
    assert "lr_gamma: 0.7" in OLD_PARAMS_YAML and "pruner_warmup_epochs: 1" in OLD_PARAMS_YAML
    with caplog.at_level(logging.WARNING):
        params = load_params(old)
        tune = load_tune(old, params)
    new = load_params(REPO / "params.yaml")
    assert params == new and flatten(params) == flatten(new)
    assert tune == load_tune(REPO / "params.yaml", new)
    assert [r.getMessage() for r in caplog.records] == [
        f"{old}: train uses the old flat layout (weight_decay, lr_gamma, lr_patience); read as"
        " train.optimizer: {name: adadelta}, train.scheduler: {name: step, gamma: 0.7};"
        " dropped, as they did nothing under its choices: weight_decay, lr_patience",
        f"{old}: tune uses the old flat layout (pruner_startup_trials, pruner_warmup_epochs); read as"
        " tune.pruner: {name: median, startup_trials: 5, warmup_epochs: 1}",
    ]
    # The stage that reads only its section converts (and says) nothing else.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        from mnist_cnn.core.params import load_section

        assert load_section(old, "data").dataset == "mnist"
    assert not caplog.records


@pytest.mark.parametrize(
    ("old_train", "optimizer", "scheduler"),
    [
        (
            {"optimizer": "adamw", "weight_decay": 0.05, "scheduler": "plateau", "lr_gamma": 0.5, "lr_patience": 4},
            OptimizerConfig("adamw", weight_decay=0.05),
            SchedulerConfig("plateau", gamma=0.5, patience=4),
        ),
        (
            {"optimizer": "sgd", "weight_decay": 0.05, "scheduler": "onecycle", "lr_gamma": 0.5, "lr_patience": 4},
            OptimizerConfig("sgd"),
            SchedulerConfig("onecycle"),
        ),
    ],
)
def test_old_flat_keys_move_where_they_act_and_go_where_they_did_nothing(old_train, optimizer, scheduler):
    raw = yaml_load(OLD_PARAMS_YAML)
    raw["train"].update(old_train)
    params = parse_params(raw)
    assert (params.train.optimizer, params.train.scheduler) == (optimizer, scheduler)


def test_old_flat_keys_beside_a_nested_setting_are_refused():
    raw = repo_params_raw()
    raw["train"]["lr_gamma"] = 0.5
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value) == (
        "train.lr_gamma: a key of the old layout beside the new train.scheduler mapping;"
        " write it as train.scheduler.gamma"
    )


def test_the_fingerprint_holds_what_acts_and_a_setting_written_two_ways_is_one_training():
    base = parse_params(repo_params_raw())
    fingerprint = json.loads(training_fingerprint(base, {}))["params"]
    assert fingerprint["train.optimizer.name"] == "adadelta" and fingerprint["train.scheduler.gamma"] == 0.7
    assert not any("weight_decay" in k or k.endswith(".patience") and "scheduler" in k for k in fingerprint)
    bare = parse_params(repo_params_raw(), {"train.optimizer": "adamw"})
    spelled = parse_params(repo_params_raw(), {"train.optimizer": "{name: adamw, weight_decay: 0.01}"})
    assert training_fingerprint(bare, {}) == training_fingerprint(spelled, {})
    assert training_fingerprint(bare, {}) != training_fingerprint(base, {})
    other_decay = parse_params(repo_params_raw(), {"train.optimizer": "adamw", "train.optimizer.weight_decay": "0.02"})
    assert training_fingerprint(other_decay, {}) != training_fingerprint(bare, {})


def test_trials_switch_settings_by_name():
    params = parse_params(repo_params_raw())
    assert with_values(params, {"train.scheduler": "onecycle"}).train.scheduler == SchedulerConfig("onecycle")
    assert with_values(params, {"train.optimizer.name": "adamw"}).train.optimizer.weight_decay == 0.01
    plateau = with_values(params, {"train.scheduler": "plateau", "train.scheduler.patience": 5})
    assert plateau.train.scheduler == SchedulerConfig("plateau", gamma=0.7, patience=5)
    with pytest.raises(ConfigError, match="adadelta takes no weight_decay"):
        with_values(params, {"train.optimizer.weight_decay": 0.05})


def test_a_searched_key_of_a_setting_must_act():
    raw = repo_params_raw()
    params, adamw = parse_params(raw), parse_params(raw, {"train.optimizer": "adamw"})
    decay = {"train.optimizer.weight_decay": {"low": 0.001, "high": 0.1, "log": True}}
    space = parse_tune({**raw["tune"], "space": decay}, adamw).space
    assert [(p.key, p.kind, p.low, p.high) for p in space] == [("train.optimizer.weight_decay", float, 0.001, 0.1)]
    with pytest.raises(ConfigError, match=r"^tune\.space\.train\.optimizer\.weight_decay\.low: .*adadelta takes no"):
        parse_tune({**raw["tune"], "space": decay}, params)
    names = {"train.optimizer": {"choices": ["adamw", "sgd"]}}
    with pytest.raises(ConfigError) as caught:
        parse_tune({**raw["tune"], "space": {**names, **decay}}, adamw)
    assert str(caught.value) == (
        "tune.space.train.optimizer.weight_decay: sgd (a choice of tune.space.train.optimizer) takes no"
        " weight_decay; search them together only with names that take it (adamw)"
    )
    both = {
        **names,
        "train.scheduler": {"choices": ["step", "onecycle"]},
        "train.scheduler.name": {"choices": ["step"]},
    }
    with pytest.raises(ConfigError, match=r"each key once \(train\.scheduler is given twice\)"):
        parse_tune({**raw["tune"], "space": both}, params)
    searched = parse_tune(
        {**raw["tune"], "space": {**names, "train.scheduler.gamma": {"low": 0.5, "high": 0.9}}}, params
    )
    assert [p.key for p in searched.space] == ["train.optimizer", "train.scheduler.gamma"]
    with pytest.raises(
        ConfigError, match=r"^tune\.space\.train\.lr_gamma: unknown parameter \(now train\.scheduler\.gamma"
    ):
        parse_tune({**raw["tune"], "space": {"train.lr_gamma": {"low": 0.5, "high": 0.9}}}, params)


@pytest.mark.parametrize("entry", ["main", "train"])
def test_mlproject_passes_any_params_key_through_as_an_override(entry):
    """main and train declare no params.yaml key (once listed in both): MLflow appends an undeclared
    parameter to the command as `--KEY VALUE`, which the stages read as an override."""
    from mlflow.projects._project_spec import load_project

    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert set(spec["entry_points"][entry]["parameters"]) <= {"params_file", "mirror"}
    given = {"epochs": "1", "lr": "0.2", "train.optimizer": "adamw", "train.scheduler.gamma": "0.5"}
    command = load_project(REPO).get_entry_point(entry).compute_command(given, storage_dir=None)
    argv = shlex.split(command.split("python -m mnist_cnn ", 1)[1])
    args, extra = build_parser().parse_known_args(argv)
    assert args.stage == ("all" if entry == "main" else "train")
    params = load_params(REPO / "params.yaml", parse_overrides(extra))
    assert (params.train.epochs, params.train.lr) == (1, 0.2)
    assert params.train.optimizer == OptimizerConfig("adamw", weight_decay=0.01)
    assert params.train.scheduler == SchedulerConfig("step", gamma=0.5)


def test_best_params_nest_a_searched_setting_key_under_its_setting():
    """A study over ``train.optimizer`` and ``train.optimizer.weight_decay`` writes a valid params.yaml
    section: the key under its setting, the searched name as the setting's ``name``."""
    from types import SimpleNamespace

    from mnist_cnn.core.params import parse_params
    from mnist_cnn.core.params_yaml import yaml_load
    from mnist_cnn.stages.tune import best_params_yaml

    best = SimpleNamespace(
        number=3,
        value=0.05,
        params={"train.optimizer": "adamw", "train.optimizer.weight_decay": 0.05, "train.lr": 0.002},
    )
    written = yaml_load(best_params_yaml(SimpleNamespace(best_trial=best, study_name="s")))
    assert written == {"train": {"optimizer": {"name": "adamw", "weight_decay": 0.05}, "lr": 0.002}}
    raw = yaml_load((REPO / "params.yaml").read_text())
    raw["train"].update(written["train"])
    train = parse_params(raw).train
    assert (train.optimizer.name, train.optimizer.weight_decay, train.lr) == ("adamw", 0.05, 0.002)
