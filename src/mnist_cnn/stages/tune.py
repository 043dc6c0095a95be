"""Tune stage: an Optuna study over ``params.yaml``'s ``tune.space``, every trial the real ``fit``.

One MLflow parent run per study, one nested child run per trial. Several workers (the same command in
several shells or on several machines) share one study through its storage, a journal file or a
database URL, and one parent run: joining the study and asking for a trial happen under a lock all
workers share, so the study gets exactly ``n_trials`` trials and one parent. The worker that finishes
last ends the parent run and writes ``reports/best_params.yaml``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
import yaml
from filelock import FileLock
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mnist_cnn.core import figures, files
from mnist_cnn.core.data import Tensors, load_train_val, verified_md5s
from mnist_cnn.core.errors import masked, one_line, without_driver_prefix
from mnist_cnn.core.loop import EpochStats, fit
from mnist_cnn.core.params import ConfigError, Params, flatten, with_values
from mnist_cnn.core.runtime import select_device, select_precision
from mnist_cnn.core.search import TUNABLE_SECTIONS, SearchParam, TuneConfig
from mnist_cnn.ops import signals
from mnist_cnn.tracking import owners, runs, store

log = logging.getLogger(__name__)


PARENT_ATTR = "mnist_cnn.parent_run_id"  # study user attr: the study's MLflow parent run


WORKERS_ATTR = "mnist_cnn.workers"  # study user attr: workers that joined (each samples with seed + index)


ACTIVE_ATTR = "mnist_cnn.active_workers"  # study user attr: owner tags of the workers still working


SPACE_ATTR = "mnist_cnn.space"  # study user attr: the first worker's search space, {key: Optuna's JSON}


OWNER_ATTR = "mnist_cnn.owner"  # trial user attr: host, pid and pid start of the worker running it


RUN_ATTR = "mnist_cnn.run_id"  # trial user attr: the trial's MLflow child run


STATE_TAG = "optuna.state"  # complete | pruned | fail, on every child run


LOCK_WAIT_S, LOCK_STALE_S = 300.0, 120.0


class TuneError(RuntimeError):
    """The study's storage cannot be opened or locked."""


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    parent_run_id: str
    trials_run: list[int]  # trial numbers this worker ran
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_params_written: bool  # only the worker that finishes last writes reports/best_params.yaml


def is_url(storage: str) -> bool:
    return "://" in storage


def open_storage(
    storage: str, root: Path, study_name: str
) -> tuple[optuna.storages.BaseStorage, contextlib.AbstractContextManager]:
    """The study's storage and the lock its workers share: a journal file (path relative to ``root``)
    with a lock file beside it, or a database URL with a lock row in the database itself."""
    if not is_url(storage):
        try:
            given = Path(storage).expanduser()  # `~/studies/x.journal`, as a shell would read it
        except RuntimeError as exc:  # `~nosuchuser/...`, or no home folder
            raise TuneError(f"tune.storage = {storage!r}: cannot expand ~ ({exc})") from None
        path = given if given.is_absolute() else root / given
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            journal_lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
            backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=journal_lock)
            _check_journal(path, journal_lock)
            opened = optuna.storages.JournalStorage(backend)
        except OSError as exc:
            reason = exc.strerror or exc
            raise TuneError(f"tune.storage = {storage!r}: cannot open the journal file ({reason})") from None
        except JournalError as exc:
            raise TuneError(f"tune.storage = {storage!r}: not a readable Optuna journal ({exc})") from None
        except Exception as exc:  # well-formed entries Optuna cannot replay
            raise TuneError(f"tune.storage = {storage!r}: not a readable Optuna journal ({one_line(exc)})") from None
        return opened, FileLock(str(path) + ".workers.lock", timeout=LOCK_WAIT_S)
    engine_kwargs = {"connect_args": {"connect_timeout": 5}} if storage.startswith("postgresql") else {}
    try:
        opened = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
    except Exception as exc:  # driver missing, host down, login refused: one line, before any trial
        reason = without_driver_prefix(one_line(exc))
        raise TuneError(f"tune.storage = {masked(storage)!r}: cannot be reached ({reason})") from None
    return opened, DatabaseLock(opened, f"{study_name}.workers-lock")


class JournalError(ValueError):
    """A line of the journal file that is not an Optuna journal entry."""


def _check_journal(path: Path, journal_lock: optuna.storages.journal.BaseJournalFileLock) -> None:
    """Every line of the journal a JSON entry ending with a newline, or ``JournalError`` naming the first
    that is not. Optuna skips a cut-off last line when reading (a writer may be at it) and then appends to
    it, which breaks the journal for good; read under Optuna's own append lock, a cut-off line is damage."""
    journal_lock.acquire()  # blocks; breaks a lock left for 30 s by a dead worker
    try:
        with open(path, "rb") as journal:
            for number, line in enumerate(journal, start=1):
                if not line.endswith(b"\n"):
                    raise JournalError(f"line {number}: cut off, no end of line")
                try:
                    entry = json.loads(line)
                except UnicodeDecodeError:
                    raise JournalError(f"line {number}: not UTF-8 text") from None
                except json.JSONDecodeError as exc:
                    raise JournalError(f"line {number}: {exc.msg} at column {exc.colno}") from None
                if not isinstance(entry, dict) or not isinstance(entry.get("op_code"), int):
                    raise JournalError(f"line {number}: JSON, but not an Optuna journal entry")
    finally:
        journal_lock.release()


class DatabaseLock:
    """A mutex for workers on several machines, in the study's database: study names are unique, so the
    worker that creates the study ``name`` holds the lock and deletes it to release. One older than
    ``LOCK_STALE_S`` (its holder died) is broken. Reusable, not reentrant."""

    def __init__(self, storage: optuna.storages.BaseStorage, name: str) -> None:
        self.storage, self.name = storage, name
        self.study_id: int | None = None

    def __enter__(self) -> None:
        deadline = time.time() + LOCK_WAIT_S
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created" per trial
        try:
            while not self._try_acquire():
                if time.time() > deadline:
                    raise TuneError(f"study lock {self.name!r} held for over {LOCK_WAIT_S:.0f} s; delete it if stale")
                time.sleep(0.1 + random.random() * 0.2)
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _try_acquire(self) -> bool:
        try:
            self.study_id = self.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], self.name)
            self.storage.set_study_user_attr(self.study_id, "created", time.time())
            return True
        except optuna.exceptions.DuplicatedStudyError:
            pass
        with contextlib.suppress(KeyError):
            held = self.storage.get_study_id_from_name(self.name)
            created = self.storage.get_study_user_attrs(held).get("created")
            if created is not None and time.time() - created > LOCK_STALE_S:
                log.warning("breaking the stale study lock %r (held for over %.0f s)", self.name, LOCK_STALE_S)
                self.storage.delete_study(held)
        return False

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(KeyError):
            self.storage.delete_study(self.study_id)
        self.study_id = None


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_epochs
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs)
    return optuna.pruners.NopPruner()


def distribution(param: SearchParam) -> optuna.distributions.BaseDistribution:
    """What a trial samples for ``param`` (``study.ask`` draws the whole space), as the study records it."""
    if param.choices:
        return optuna.distributions.CategoricalDistribution(list(param.choices))
    if param.kind is int:
        return optuna.distributions.IntDistribution(int(param.low), int(param.high), log=param.log)
    return optuna.distributions.FloatDistribution(param.low, param.high, log=param.log)


def _described(dist: optuna.distributions.BaseDistribution) -> str:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    kind = "integers" if isinstance(dist, optuna.distributions.IntDistribution) else "numbers"
    return f"{kind} [{dist.low}, {dist.high}]{' log' if dist.log else ''}"


def _check_space(study: optuna.Study, cfg: TuneConfig) -> None:
    """``cfg.space`` against the distributions the study's trials recorded, before anything is touched:
    Optuna refuses other choices, another kind or scale for a key only when a trial samples it, in the
    middle of the study. Ranges may move (Optuna allows it). The space the study was made with counts
    too: a second worker started at the same instant as the first finds no trial yet."""
    made_with = study.user_attrs.get(SPACE_ATTR, {})
    recorded = {key: optuna.distributions.json_to_distribution(text) for key, text in made_with.items()}
    for trial in study.get_trials(deepcopy=False):
        recorded.update(trial.distributions)
    for param in cfg.space:
        old, new = recorded.get(param.key), distribution(param)
        if old is None:
            continue
        try:
            optuna.distributions.check_distribution_compatibility(old, new)
        except ValueError:
            raise ConfigError(
                f"tune.space.{param.key}: the study {cfg.study_name!r} was made with another search space"
                f" ({_described(old)}, now {_described(new)}); use a new tune.study_name"
            ) from None


class TrialReporter:
    """``fit``'s reporter for one trial: per-epoch metrics into the child run, the validation loss to
    Optuna, and ``optuna.TrialPruned`` out of ``fit`` when the pruner gives up on the trial."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def log_epoch(self, stats: EpochStats) -> None:
        # Synchronous: a trial's run is short, and MLflow's async queue costs about a second per run to
        # shut down.
        mlflow.log_metrics({k: v for k, v in vars(stats).items() if k != "epoch"}, step=stats.epoch, synchronous=True)
        self.trial.report(stats.val_loss, stats.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number}: pruned after epoch {stats.epoch}")


def _tags(tags: Mapping[str, str]) -> list[RunTag]:
    return [RunTag(k, str(v)) for k, v in tags.items()]


def _claim_parent(client: MlflowClient, parent: str) -> None:
    """The parent is RUNNING while any worker works, owned by a live one: reopen it if a worker that
    thought it was the last ended it, or if its owner is gone."""
    run = client.get_run(parent)
    if run.info.status != "RUNNING" or owners.run_is_stale(run.data.tags, store.is_local_store()):
        client.update_run(parent, status="RUNNING")
        client.log_batch(parent, tags=_tags(owners.owner_tags()))


def _tune_params(cfg: TuneConfig) -> dict[str, str]:
    values = {f"tune.{k}": v for k, v in vars(cfg).items() if k != "space"}
    values["tune.storage"] = masked(cfg.storage) if is_url(cfg.storage) else cfg.storage
    for p in cfg.space:
        how = f"choices {list(p.choices)}" if p.choices else f"[{p.low}, {p.high}]{' log' if p.log else ''}"
        values[f"tune.space.{p.key}"] = how
    return {k: str(v) for k, v in values.items()}


def _join(
    storage: optuna.storages.BaseStorage,
    cfg: TuneConfig,
    exp_id: str,
    root: Path,
    launcher: str | None = None,
) -> tuple[optuna.Study, str]:
    """Create or load the study and its parent run (under the workers' lock: one parent per study).
    ``launcher``: the run ``mlflow run`` made for this worker; the first worker's becomes the parent."""
    try:  # loaded, not create_study(load_if_exists): that appends a create entry to the journal each time
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
    except KeyError:
        study = optuna.create_study(
            storage=storage, study_name=cfg.study_name, direction="minimize", load_if_exists=True
        )
    _check_space(study, cfg)
    if SPACE_ATTR not in study.user_attrs:
        space = {p.key: optuna.distributions.distribution_to_json(distribution(p)) for p in cfg.space}
        study.set_user_attr(SPACE_ATTR, space)
    client = MlflowClient()
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is None or not runs.run_exists(parent, root):
        tags = {
            **owners.owner_tags(),
            **runs.git_lineage(root),
            "optuna.study_name": cfg.study_name,
            "mnist_cnn.stage": "tune",
        }
        if launcher and runs.run_exists(launcher, root):
            parent = launcher
            client.update_run(parent, name=cfg.study_name)
            client.log_batch(parent, tags=_tags(tags))
        else:
            parent = client.create_run(exp_id, run_name=cfg.study_name, tags=tags).info.run_id
        client.log_batch(parent, params=[mlflow.entities.Param(k, v) for k, v in _tune_params(cfg).items()])
        study.set_user_attr(PARENT_ATTR, parent)
        log.info("study %r: new parent run %s", cfg.study_name, parent)
    else:
        _claim_parent(client, parent)
        log.info("study %r: joining, parent run %s", cfg.study_name, parent)
        if launcher and launcher != parent:
            client.set_tag(launcher, "mnist_cnn.tune_parent", parent)  # a later worker's `mlflow run`
    worker = study.user_attrs.get(WORKERS_ATTR, 0)
    study.set_user_attr(WORKERS_ATTR, worker + 1)
    study.set_user_attr(ACTIVE_ATTR, [*_active_workers(study), owners.owner_tags()])
    # Workers with the same seed would sample the same first configurations: each its own.
    study.sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed + worker)
    study.pruner = make_pruner(cfg)
    return study, parent


def _run_trial(
    trial: optuna.Trial,
    params: Params,
    cfg: TuneConfig,
    data: tuple[Tensors, Tensors, torch.device, str],
    parent: str,
    root: Path,
    show_progress: bool | None,
) -> float:
    """One trial in its child run: the sampled values, the real ``fit`` for ``tune.epochs`` epochs."""
    values = {p.key: trial.params[p.key] for p in cfg.space}
    # A trial's value is the validation loss of the epoch it keeps, so it keeps the lowest one.
    trial_params = with_values(params, {**values, "train.epochs": cfg.epochs, "train.monitor": "val_loss"})
    tags = {"optuna.study_name": cfg.study_name, "optuna.trial_number": str(trial.number)}
    with runs.run(
        params.mlflow.experiment,
        root=root,
        parent_run_id=parent,
        name=f"trial-{trial.number}",
        tags=tags,
        ended_as={optuna.TrialPruned: "KILLED"},
    ) as active:
        trial.set_user_attr(RUN_ATTR, active.info.run_id)
        flat = {k: v for k, v in flatten(trial_params).items() if k.split(".")[0] in ("data", *TUNABLE_SECTIONS)}
        mlflow.log_params(flat, synchronous=True)
        state = "fail"
        try:
            _, result = fit(trial_params, *data, reporter=TrialReporter(trial), show_progress=show_progress)
            state = "complete"
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:
            mlflow.set_tag(STATE_TAG, state)
        mlflow.log_metrics({"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch})
    return result.best_val_loss


def _active_workers(study: optuna.Study) -> list[dict[str, str]]:
    """The workers of the study still working: alive, or on another host (where that cannot be told);
    one killed (``kill -9``) drops out here."""
    local = store.is_local_store()
    return [w for w in study.user_attrs.get(ACTIVE_ATTR, []) if owners.run_is_stale(w, local) is not True]


def best_params_yaml(study: optuna.Study) -> str:
    """The best trial's values in ``params.yaml``'s shape, with the ``dvc exp run`` that applies them."""
    best = study.best_trial
    sections: dict[str, dict[str, Any]] = {}
    for section in TUNABLE_SECTIONS:
        for key, value in best.params.items():
            if key.startswith(f"{section}."):
                sections.setdefault(section, {})[key.split(".", 1)[1]] = value
    set_params = " ".join(f"-S {k}={v}" for k, v in best.params.items())
    header = (
        f"# Best trial {best.number} of study {study.study_name!r}: validation loss {best.value:.6g}.\n"
        f"# Apply: dvc exp run {set_params}\n"
        "# or copy these keys into params.yaml's sections.\n"
    )
    return header + yaml.safe_dump(sections, sort_keys=False)


def _log_plots(client: MlflowClient, parent: str, study: optuna.Study) -> None:
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
            client.log_figure(parent, figure, name)
            figures.close(figure)


def _summarise(client: MlflowClient, parent: str, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
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
    now = int(time.time() * 1000)
    client.log_batch(
        parent,
        metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=_tags(
            {
                **{f"best.{k}": v for k, v in best.params.items()},
                "best.trial": best.number,
                "best.run_id": best.user_attrs.get(RUN_ATTR, ""),
            }
        ),
    )
    return best


def _leave(study: optuna.Study, parent: str, outcome: str, reports: Path) -> bool:
    """Update the parent with the best so far. If other workers still work, hand the parent to one of
    them; else (the last worker) write the best params and plots, and end the parent."""
    client = MlflowClient()
    best = _summarise(client, parent, study)
    me = owners.owner_tags()
    others = [w for w in _active_workers(study) if w != me]
    study.set_user_attr(ACTIVE_ATTR, others)
    if others:
        client.log_batch(parent, tags=_tags(others[0]))  # the parent's owner must be a live worker
        log.info("%d other worker(s) still working: the last one ends run %s", len(others), parent)
        return False
    written = False
    try:
        if best is not None:
            text = best_params_yaml(study)
            files.write_text_atomic(reports / files.BEST_PARAMS.name, text)
            written = True
            log.info("best trial %d (validation loss %.4g) written to %s", best.number, best.value, files.BEST_PARAMS)
            client.log_text(parent, text, "best_params.yaml")
            _log_plots(client, parent, study)
        else:
            log.warning("study %r: no trial completed; %s not written", study.study_name, files.BEST_PARAMS)
    except BaseException:  # reports/ read-only, a full disk: the parent is never left RUNNING
        client.set_terminated(parent, "FAILED")
        raise
    client.set_terminated(parent, outcome)
    return written


def _load_data(params: Params, data_dir: Path) -> tuple[Tensors, Tensors, torch.device, str]:
    """The training data once per worker (not per trial), on the device every trial trains on."""
    verified_md5s(data_dir, params.data.dataset)
    device = select_device(params.train.device)
    precision = select_precision(params.train.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_data, val_data = load_train_val(
        data_dir, params.data.dataset, params.train.val_split, params.train.seed, device
    )
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
    client = MlflowClient()
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    ran: list[int] = []
    outcome, parent = "FAILED", None
    try:
        # Ctrl-C while the parent is claimed would leave it RUNNING: it waits, then ends the parent KILLED.
        with lock, signals.signals_deferred():
            study, parent = _join(storage, cfg, exp_id, store_root, launcher)
        while deadline is None or time.monotonic() < deadline:
            with lock:  # count and ask together: the study gets exactly n_trials, whatever the workers
                if len(study.get_trials(deepcopy=False)) >= cfg.n_trials:
                    break
                trial = study.ask({p.key: distribution(p) for p in cfg.space})
                trial.set_user_attr(OWNER_ATTR, owners.owner_tags())
                _claim_parent(client, parent)
            ran.append(trial.number)
            try:
                value = _run_trial(trial, params, cfg, data, parent, store_root, show_progress)
            except optuna.TrialPruned as exc:
                study.tell(trial, state=TrialState.PRUNED)
                log.info("%s", exc)
            except store.TrackingError:  # the tracking server went away: no point in further trials
                study.tell(trial, state=TrialState.FAIL)
                raise
            except RuntimeError as exc:  # diverged, out of memory: this configuration fails, the study goes on
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, one_line(exc))
            except BaseException:
                with signals.signals_deferred():  # a second Ctrl-C must not leave the trial RUNNING
                    study.tell(trial, state=TrialState.FAIL)
                raise
            else:
                study.tell(trial, value)
                log.info("trial %d: validation loss %.4g", trial.number, value)
        outcome = "FINISHED"
    except KeyboardInterrupt:
        outcome = "KILLED"
        raise
    finally:
        if parent is not None:
            # A second Ctrl-C (or SIGTERM) waits until the parent has ended, then interrupts.
            with signals.signals_deferred(), lock:
                written = _leave(study, parent, outcome, root / files.REPORTS_DIR)
    try:
        best = study.best_trial
    except ValueError:
        best = None
    return TuneResult(
        study_name=cfg.study_name,
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
