"""Tune stage: an Optuna study over ``params.yaml``'s ``tune.space``, every trial the real ``fit``.

One MLflow parent run per study, one nested child run per trial (``tracking/tuning.py`` records them).
Several workers (the same command in several shells or on several machines) share one study through its
storage, a journal file or a database URL, and one parent run: joining the study and asking for a trial
happen under a lock all workers share (``stages/tune_study.py``), so the study gets exactly ``n_trials``
trials and one parent. The worker that finishes last ends the parent run and writes
``reports/best_params.yaml``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import TrialState

from mnist_cnn.core import files
from mnist_cnn.core.data import Tensors, verified_md5s
from mnist_cnn.core.data_checks import training_and_validation
from mnist_cnn.core.errors import one_line
from mnist_cnn.core.loop import EpochStats, fit
from mnist_cnn.core.params import Params, flatten, with_values
from mnist_cnn.core.runtime import select_device, select_precision
from mnist_cnn.core.search import TUNABLE_SECTIONS, TuneConfig, fixed_params
from mnist_cnn.ops import signals
from mnist_cnn.stages.tune_study import (
    CONFIG_FAILURE,
    FAILED_ATTR,
    OWNER_ATTR,
    check_study,
    counted_trials,
    distribution,
    fail_trials_of_gone_workers,
    open_storage,
    record_study,
)
from mnist_cnn.tracking import owners, runs, store, tuning

log = logging.getLogger(__name__)


PARENT_ATTR = "mnist_cnn.parent_run_id"  # study user attr: the study's MLflow parent run


WORKERS_ATTR = "mnist_cnn.workers"  # study user attr: workers that joined (each samples with seed + index)


ACTIVE_ATTR = "mnist_cnn.active_workers"  # study user attr: owner tags of the workers still working


RUN_ATTR = "mnist_cnn.run_id"  # trial user attr: the trial's MLflow child run


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    parent_run_id: str
    trials_run: list[int]  # trial numbers this worker ran
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_params_written: bool  # only the worker that finishes last writes reports/best_params.yaml


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of this worker shares."""

    params: Params
    cfg: TuneConfig
    data: tuple[Tensors, Tensors, torch.device, str]  # train and validation data, device, precision
    parent: str  # the study's MLflow parent run
    root: Path  # the project root of the MLflow store
    show_progress: bool | None


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner.startup_trials, n_warmup_steps=cfg.pruner.warmup_epochs
        )
    if cfg.pruner.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs)
    return optuna.pruners.NopPruner()


class TrialReporter:
    """``fit``'s reporter for one trial: per-epoch metrics into the child run, the validation loss to
    Optuna, and ``optuna.TrialPruned`` out of ``fit`` when the pruner gives up on the trial."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def log_epoch(self, stats: EpochStats) -> None:
        signals.raise_if_stopped()
        tuning.log_trial_epoch(stats)
        self.trial.report(stats.val_loss, stats.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number}: pruned after epoch {stats.epoch}")


def _join(
    storage: optuna.storages.BaseStorage,
    cfg: TuneConfig,
    exp_id: str,
    root: Path,
    fixed: dict[str, Any],
    launcher: str | None = None,
) -> tuple[optuna.Study, str]:
    """Create or load the study and its parent run (under the workers' lock: one parent per study).
    ``fixed``: this worker's params that are not searched, which must be the study's.
    ``launcher``: the run ``mlflow run`` made for this worker; the first worker's becomes the parent."""
    try:  # loaded, not create_study(load_if_exists): that appends a create entry to the journal each time
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
    except KeyError:
        study = optuna.create_study(
            storage=storage, study_name=cfg.study_name, direction="minimize", load_if_exists=True
        )
    check_study(study, cfg, fixed)
    record_study(study, cfg, fixed)
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is None or not runs.run_exists(parent, root):
        parent = tuning.create_parent_run(cfg, exp_id, root, launcher)
        study.set_user_attr(PARENT_ATTR, parent)
        log.info("study %r: new parent run %s", cfg.study_name, parent)
    else:
        tuning.join_parent_run(parent, launcher)
        log.info("study %r: joining, parent run %s", cfg.study_name, parent)
    worker = study.user_attrs.get(WORKERS_ATTR, 0)
    study.set_user_attr(WORKERS_ATTR, worker + 1)
    study.set_user_attr(ACTIVE_ATTR, [*_active_workers(study), owners.owner_tags()])
    # Workers with the same seed would sample the same first configurations: each its own.
    study.sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed + worker)
    study.pruner = make_pruner(cfg)
    return study, parent


def _run_trial(trial: optuna.Trial, setup: TrialSetup) -> float:
    """One trial in its child run: the sampled values, the real ``fit`` for ``tune.epochs`` epochs."""
    cfg = setup.cfg
    values = {p.key: trial.params[p.key] for p in cfg.space}
    # A trial's value is the validation loss of the epoch it keeps, so it keeps the lowest one.
    trial_params = with_values(setup.params, {**values, "train.epochs": cfg.epochs, "train.monitor": "val_loss"})
    experiment = setup.params.mlflow.experiment
    pruned = optuna.TrialPruned
    with tuning.trial_run(experiment, setup.root, setup.parent, cfg.study_name, trial.number, pruned) as run_id:
        trial.set_user_attr(RUN_ATTR, run_id)
        flat = {k: v for k, v in flatten(trial_params).items() if k.split(".")[0] in ("data", *TUNABLE_SECTIONS)}
        tuning.log_trial_params(flat)
        with tuning.trial_state_tagged(pruned):
            reporter = TrialReporter(trial)
            _, result = fit(trial_params, *setup.data, reporter=reporter, show_progress=setup.show_progress)
        tuning.log_trial_result(result.best_val_loss, result.best_epoch)
    return result.best_val_loss


def _run_and_tell(study: optuna.Study, trial: optuna.Trial, setup: TrialSetup) -> None:
    """Run ``trial`` and tell the study how it ended. A trial that diverges or runs out of memory fails
    and the study goes on; a lost tracking server or an interrupt fails it and stops the worker."""
    try:
        value = _run_trial(trial, setup)
    except optuna.TrialPruned as exc:
        study.tell(trial, state=TrialState.PRUNED)
        log.info("%s", exc)
    except store.TrackingError:  # the tracking server went away: no point in further trials
        study.tell(trial, state=TrialState.FAIL)
        raise
    except RuntimeError as exc:  # diverged, out of memory: this configuration fails, the study goes on
        trial.set_user_attr(FAILED_ATTR, CONFIG_FAILURE)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, one_line(exc))
    except BaseException:
        with signals.signals_deferred():  # a second Ctrl-C must not leave the trial RUNNING
            study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        study.tell(trial, value)
        log.info("trial %d: validation loss %.4g", trial.number, value)


def _run_trials(
    study: optuna.Study, lock: contextlib.AbstractContextManager, setup: TrialSetup, deadline: float | None
) -> list[int]:
    """Trials until the study holds ``tune.n_trials`` (counting every worker's) or ``deadline``
    (``time.monotonic``) has passed; the numbers of those this worker ran."""
    ran: list[int] = []
    while deadline is None or time.monotonic() < deadline:
        with lock:  # count and ask together: the study gets exactly n_trials, whatever the workers
            fail_trials_of_gone_workers(study)
            if counted_trials(study) >= setup.cfg.n_trials:
                break
            trial = study.ask({p.key: distribution(p) for p in setup.cfg.space})
            trial.set_user_attr(OWNER_ATTR, owners.owner_tags())
            tuning.claim_parent_run(setup.parent)
        ran.append(trial.number)
        _run_and_tell(study, trial, setup)
    return ran


def _active_workers(study: optuna.Study) -> list[dict[str, str]]:
    """The workers of the study still working: alive, or on another host (where that cannot be told);
    one killed (``kill -9``) drops out here."""
    local = store.is_local_store()
    return [w for w in study.user_attrs.get(ACTIVE_ATTR, []) if owners.run_is_stale(w, local) is not True]


def best_params_yaml(study: optuna.Study) -> str:
    """The best trial's values in ``params.yaml``'s shape, with the ``dvc exp run`` that applies them."""
    best = study.best_trial
    sections: dict[str, dict[str, Any]] = {}
    for key, value in best.params.items():
        section, *path = key.split(".")
        if section in TUNABLE_SECTIONS:
            _nest(sections.setdefault(section, {}), path, value)
    set_params = " ".join(f"-S {k}={v}" for k, v in best.params.items())
    header = (
        f"# Best trial {best.number} of study {study.study_name!r}: validation loss {best.value:.6g}.\n"
        f"# Apply: dvc exp run {set_params}\n"
        "# or copy these keys into params.yaml's sections.\n"
    )
    return header + yaml.safe_dump(sections, sort_keys=False)


def _nest(node: dict[str, Any], path: list[str], value: Any) -> None:
    """``optimizer.weight_decay`` as ``{optimizer: {weight_decay: ...}}``; a setting's bare name beside
    keys of its own (``optimizer: adamw`` and ``optimizer.weight_decay``) becomes its ``name``."""
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            node[part] = child = {} if child is None else {"name": child}
        node = child
    if isinstance(node.get(path[-1]), dict):
        node[path[-1]]["name"] = value
    else:
        node[path[-1]] = value


def _log_plots(parent: str, study: optuna.Study) -> None:
    """The study's optimisation history and parameter importances into the parent run."""
    import optuna.visualization.matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # "too few trials", "no artists with labels"
        for name, plot in (
            ("optimization_history.png", plots.plot_optimization_history),
            ("param_importances.png", plots.plot_param_importances),
        ):
            try:
                figure = plot(study).figure
            except Exception as exc:  # e.g. importances need two finished trials that differ
                log.warning("%s: not plotted (%s)", name, one_line(exc))
                continue
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            tuning.log_parent_figure(parent, figure, name)


def _summarise(parent: str, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best trial so far into the parent run: metric ``best_value``, tags ``best.<key>``."""
    try:
        best = study.best_trial
    except ValueError:  # no trial finished
        return None
    counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for t in study.get_trials(deepcopy=False):
        if t.state.name.lower() in counts:
            counts[t.state.name.lower()] += 1
    metrics = {"best_value": best.value, "best_trial": best.number, **{f"trials_{k}": v for k, v in counts.items()}}
    tags = {
        **{f"best.{k}": v for k, v in best.params.items()},
        "best.trial": best.number,
        "best.run_id": best.user_attrs.get(RUN_ATTR, ""),
    }
    tuning.log_study_summary(parent, metrics, tags)
    return best


def _leave(study: optuna.Study, parent: str, outcome: str, reports: Path) -> bool:
    """Update the parent with the best so far. If other workers still work, hand the parent to one of
    them; else (the last worker) write the best params and plots, and end the parent."""
    best = _summarise(parent, study)
    me = owners.owner_tags()
    others = [w for w in _active_workers(study) if w != me]
    study.set_user_attr(ACTIVE_ATTR, others)
    if others:
        tuning.hand_parent_run_to(parent, others[0])  # the parent's owner must be a live worker
        log.info("%d other worker(s) still working: the last one ends run %s", len(others), parent)
        return False
    written = False
    try:
        if best is not None:
            text = best_params_yaml(study)
            files.write_text_atomic(reports / files.BEST_PARAMS.name, text)
            written = True
            log.info("best trial %d (validation loss %.4g) written to %s", best.number, best.value, files.BEST_PARAMS)
            tuning.log_parent_text(parent, text, "best_params.yaml")
            _log_plots(parent, study)
        else:
            log.warning("study %r: no trial completed; %s not written", study.study_name, files.BEST_PARAMS)
    except BaseException:  # reports/ read-only, a full disk: the parent is never left RUNNING
        tuning.end_parent_run(parent, "FAILED")
        raise
    tuning.end_parent_run(parent, outcome)
    return written


def _load_data(params: Params, data_dir: Path) -> tuple[Tensors, Tensors, torch.device, str]:
    """The training data once per worker (not per trial), on the device every trial trains on."""
    verified_md5s(data_dir, params.data.dataset)
    device = select_device(params.train.device)
    precision = select_precision(params.train.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_data, val_data = training_and_validation(params, data_dir, device)
    return train_data, val_data, device, precision


def tune(params: Params, cfg: TuneConfig, root: Path = Path("."), show_progress: bool | None = None) -> TuneResult:
    """Run trials of the study ``cfg.study_name`` until it holds ``cfg.n_trials`` (counting every worker's)
    or ``cfg.timeout`` seconds have passed; return what this worker did and the study's best."""
    root = Path(root)
    store_root = store.project_root(root.resolve())
    storage, lock = open_storage(cfg.storage, root, cfg.study_name)  # an unreachable database fails here
    store.configure(store_root)  # so does a dead tracking server
    data = _load_data(params, root / files.DATA_DIR)
    exp_id = store.experiment_id(params.mlflow.experiment, store_root)
    # Under `mlflow run`, MLflow made a run for this process; trials must not resume it (start_run
    # reads the variable), so it is taken out of the environment and offered as the parent.
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    outcome, parent = "FAILED", None
    try:
        # Ctrl-C while the parent is claimed would leave it RUNNING: it waits, then ends the parent KILLED.
        with lock, signals.signals_deferred():
            study, parent = _join(storage, cfg, exp_id, store_root, fixed_params(params, cfg), launcher)
        ran = _run_trials(study, lock, TrialSetup(params, cfg, data, parent, store_root, show_progress), deadline)
        outcome = "FINISHED"
    except KeyboardInterrupt:
        outcome = "KILLED"
        raise
    finally:
        if parent is not None:
            # A second Ctrl-C (or SIGTERM) waits until the parent has ended, then interrupts.
            with signals.signals_deferred(), lock:
                written = _leave(study, parent, outcome, root / files.REPORTS_DIR)
    return _result(study, parent, ran, written)


def _result(study: optuna.Study, parent: str, ran: list[int], written: bool) -> TuneResult:
    try:
        best = study.best_trial
    except ValueError:
        best = None
    return TuneResult(
        study_name=study.study_name,
        parent_run_id=parent,
        trials_run=ran,
        best_trial=None if best is None else best.number,
        best_value=None if best is None else best.value,
        best_params={} if best is None else dict(best.params),
        best_params_written=written,
    )


def describe(result: TuneResult) -> str:
    """The worker's summary line(s) for the CLI."""
    lines = [f"study {result.study_name!r}: this worker ran trial(s) {result.trials_run or 'none'}"]
    if result.best_trial is not None:
        lines.append(f"best trial {result.best_trial}: validation loss {result.best_value:.4g}")
        lines.append(f"best params {json.dumps(result.best_params)}")
    lines.append(f"MLflow parent run {result.parent_run_id}")
    return "\n".join(lines)
