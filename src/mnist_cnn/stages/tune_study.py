"""The tune stage's Optuna study: its storage, the lock its workers share, the settings it was made with,
and the trials its workers left.

Several workers (the same command in several shells or on several machines) share one study through its
storage, a journal file or a database URL. Joining the study and asking for a trial happen under a lock
all workers share: a file lock beside a journal, a ``NamedLock`` on a study record in a database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from filelock import FileLock
from optuna.trial import TrialState

from mnist_cnn.core.errors import ProjectError, masked, one_line, without_driver_prefix
from mnist_cnn.core.files import is_url
from mnist_cnn.core.params import ConfigError
from mnist_cnn.core.search import SearchParam, TuneConfig
from mnist_cnn.ops.lock import NamedLock
from mnist_cnn.tracking import owners, store

log = logging.getLogger(__name__)


SPACE_ATTR = "mnist_cnn.space"  # study user attr: the first worker's search space, {key: Optuna's JSON}


FIXED_ATTR = "mnist_cnn.fixed_params"  # study user attr: the first worker's params that are not searched


OWNER_ATTR = "mnist_cnn.owner"  # trial user attr: the owner tags (owners.owner_tags) of the worker running it


FAILED_ATTR = "mnist_cnn.failed"  # trial user attr: why it failed, where that is its configuration's fault


CONFIG_FAILURE = "configuration"  # diverged, out of memory: a verdict on the configuration, it counts


LOCK_WAIT_S, LOCK_STALE_S = 300.0, 120.0


class TuneError(ProjectError, RuntimeError):
    """The study's storage cannot be opened or locked."""


def open_storage(
    storage: str, root: Path, study_name: str
) -> tuple[optuna.storages.BaseStorage, contextlib.AbstractContextManager]:
    """The study's storage and the lock its workers share: a journal file (path relative to ``root``)
    with a lock file beside it, or a database URL with a lock record in the database itself."""
    if not is_url(storage):
        path = _journal_path(storage, root)
        _check_journal_place(storage, path)  # before any lock file is made beside it
        return _open_journal(storage, path), FileLock(str(path) + ".workers.lock", timeout=LOCK_WAIT_S)
    engine_kwargs = {"connect_args": {"connect_timeout": 5}} if storage.startswith("postgresql") else {}
    try:
        opened = _rdb_storage(storage, engine_kwargs)
    except Exception as exc:  # driver missing, host down, login refused: one line, before any trial
        reason = without_driver_prefix(one_line(exc))
        raise TuneError(f"tune.storage = {masked(storage)!r}: cannot be reached ({reason})") from None
    return opened, database_lock(opened, f"{study_name}.workers-lock")


# Workers started together on a new database race in Optuna's CREATE TABLE statements: PostgreSQL answers
# the loser "duplicate key value violates unique constraint pg_type_typname_nsp_index" (or "relation ...
# already exists"). By then the winner has made the tables, and opening the storage again finds them.
SCHEMA_RACE, SCHEMA_ATTEMPTS = ("duplicate key value", "already exists"), 3


def _rdb_storage(storage: str, engine_kwargs: dict) -> optuna.storages.RDBStorage:
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            if attempt == SCHEMA_ATTEMPTS or not any(sign in str(exc) for sign in SCHEMA_RACE):
                raise
        time.sleep(1.0)


def _journal_path(storage: str, root: Path) -> Path:
    try:
        given = Path(storage).expanduser()  # `~/studies/x.journal`, as a shell would read it
    except RuntimeError as exc:  # `~nosuchuser/...`, or no home folder
        raise TuneError(f"tune.storage = {storage!r}: cannot expand ~ ({exc})") from None
    return given if given.is_absolute() else root / given


def _check_journal_place(storage: str, path: Path) -> None:
    """A journal is a regular file, or a path where one can be made: its directory (or the nearest one
    that exists, the rest is made) writable, for the journal and the lock files beside it. ``/dev/null``
    or a directory would fail deep in Optuna, after a lock file was made beside it."""
    if path.exists() and not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise TuneError(f"tune.storage = {storage!r}: {path} is {what} (expected an Optuna journal file)")
    directory = next(d for d in path.parents if d.exists())
    if not directory.is_dir():
        raise TuneError(f"tune.storage = {storage!r}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TuneError(f"tune.storage = {storage!r}: the directory {directory} is not writable")


def _open_journal(storage: str, path: Path) -> optuna.storages.JournalStorage:
    """The journal at ``path`` (made if missing), checked line by line; ``storage`` as the user wrote it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        journal_lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
        backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=journal_lock)
        _check_journal(path, journal_lock)
        return optuna.storages.JournalStorage(backend)
    except OSError as exc:
        reason = exc.strerror or exc
        raise TuneError(f"tune.storage = {storage!r}: cannot open the journal file ({reason})") from None
    except JournalError as exc:
        raise TuneError(f"tune.storage = {storage!r}: not a readable Optuna journal ({exc})") from None
    except Exception as exc:  # well-formed entries Optuna cannot replay
        raise TuneError(f"tune.storage = {storage!r}: not a readable Optuna journal ({one_line(exc)})") from None


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


class StudyRecordLockBackend:
    """``NamedLock``'s record in an Optuna database: a study called ``name`` (study names are unique, so
    only one worker can create it), with its creation time as the user attr ``created``."""

    def __init__(self, storage: optuna.storages.BaseStorage, name: str) -> None:
        self.storage, self.name = storage, name
        self.study_id: int | None = None  # the record last created or looked at

    def try_create(self) -> bool:
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created" per trial
        try:
            self.study_id = self.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], self.name)
        except optuna.exceptions.DuplicatedStudyError:
            return False
        finally:
            optuna.logging.set_verbosity(verbosity)
        self.storage.set_study_user_attr(self.study_id, "created", time.time())
        return True

    def age_s(self) -> float | None:
        try:
            self.study_id = self.storage.get_study_id_from_name(self.name)
            created = self.storage.get_study_user_attrs(self.study_id).get("created")
        except KeyError:  # released meanwhile
            return None
        return None if created is None else time.time() - created

    def delete(self) -> None:
        # By id, not name: a record that replaced ours (after a break) is not ours to delete.
        with contextlib.suppress(KeyError):
            self.storage.delete_study(self.study_id)
        self.study_id = None


def database_lock(storage: optuna.storages.BaseStorage, name: str) -> NamedLock:
    """A mutex for workers on several machines, in the study's database: the study record ``name``, held
    while it exists; one older than ``LOCK_STALE_S`` (its holder died) is broken."""
    backend = StudyRecordLockBackend(storage, name)
    return NamedLock(backend, f"study lock {name!r}", LOCK_WAIT_S, LOCK_STALE_S, error=TuneError)


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


def _remedy(cfg: TuneConfig) -> str:
    if is_url(cfg.storage):
        return f"use a new tune.study_name, or delete the study {cfg.study_name!r} from the database"
    return f"use a new tune.study_name, or delete the journal {cfg.storage}"


def _space_json(cfg: TuneConfig) -> dict[str, str]:
    return {p.key: optuna.distributions.distribution_to_json(distribution(p)) for p in cfg.space}


def check_study(study: optuna.Study, cfg: TuneConfig, fixed: dict[str, Any]) -> None:
    """The study's search space and fixed params (``core.search.fixed_params``) against this worker's,
    before anything is touched: its trials, its best params, are only worth going on with under the same
    settings (else a DVC rerun after a change of ``train.optimizer`` would bless the old best again)."""
    trials = len(study.get_trials(deepcopy=False))
    if trials and (SPACE_ATTR not in study.user_attrs or FIXED_ATTR not in study.user_attrs):
        raise ConfigError(
            f"the study {cfg.study_name!r} has {trials} trial(s) but no record of the params they were trained"
            f" with (made by an older version); {_remedy(cfg)}"
        )
    if SPACE_ATTR in study.user_attrs:
        _check_space(study.user_attrs[SPACE_ATTR], cfg)
    if FIXED_ATTR in study.user_attrs:
        _check_fixed(study.user_attrs[FIXED_ATTR], fixed, cfg)


def _check_space(made_with: dict[str, str], cfg: TuneConfig) -> None:
    now = _space_json(cfg)
    if sorted(made_with) != sorted(now):
        raise ConfigError(
            f"tune.space: the study {cfg.study_name!r} was made with another search space (it searched"
            f" {', '.join(sorted(made_with))}; now {', '.join(sorted(now))}); {_remedy(cfg)}"
        )
    for key, text in now.items():
        old, new = (optuna.distributions.json_to_distribution(t) for t in (made_with[key], text))
        if old != new:  # a moved range too: the best so far may lie outside the new one
            raise ConfigError(
                f"tune.space.{key}: the study {cfg.study_name!r} was made with another search space"
                f" ({_described(old)}, now {_described(new)}); {_remedy(cfg)}"
            )


def _shown(values: dict[str, Any], key: str) -> str:
    return repr(values[key]) if key in values else "(unset)"


def _check_fixed(made_with: dict[str, Any], fixed: dict[str, Any], cfg: TuneConfig) -> None:
    keys = sorted({*made_with, *fixed})
    changed = [k for k in keys if (k in made_with, made_with.get(k)) != (k in fixed, fixed.get(k))]
    if changed:
        shown = [f"{k} = {_shown(made_with, k)} (now {_shown(fixed, k)})" for k in changed[:3]]
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"the study {cfg.study_name!r} was made with other params: {', '.join(shown)}{more}; {_remedy(cfg)}"
        )


def record_study(study: optuna.Study, cfg: TuneConfig, fixed: dict[str, Any]) -> None:
    """Record ``cfg.space`` and ``fixed`` as the settings the study was made with, unless recorded already."""
    if SPACE_ATTR not in study.user_attrs:
        study.set_user_attr(SPACE_ATTR, _space_json(cfg))
    if FIXED_ATTR not in study.user_attrs:
        study.set_user_attr(FIXED_ATTR, fixed)


def fail_trials_of_gone_workers(study: optuna.Study) -> None:
    """A worker killed in a trial (``kill -9``, OOM) leaves it RUNNING for good: end it FAIL once its
    worker is provably gone (``owners.run_is_stale``; a worker elsewhere is left alone)."""
    local = store.is_local_store()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR)
        if owner is not None and owners.run_is_stale(owner, local) is True:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            log.warning(
                "trial %d was left RUNNING (its worker, process %s, is gone): ended FAIL",
                trial.number,
                owner.get(owners.PID_TAG),
            )


def counted_trials(study: optuna.Study) -> int:
    """The trials that count toward ``tune.n_trials``: finished (complete, pruned), running (in a live
    worker, or one that cannot be proven gone), and failed by their configuration (diverged). One that
    failed because its worker stopped (killed, interrupted, the tracking server lost) tried nothing."""
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(
        t.state in counted or (t.state == TrialState.FAIL and t.user_attrs.get(FAILED_ATTR) == CONFIG_FAILURE)
        for t in study.get_trials(deepcopy=False)
    )
