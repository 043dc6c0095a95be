"""The tune stage's Optuna study: its storage, the lock its workers share, and its search space.

Several workers (the same command in several shells or on several machines) share one study through its
storage, a journal file or a database URL. Joining the study and asking for a trial happen under a lock
all workers share: a file lock beside a journal, a ``NamedLock`` on a study record in a database.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import optuna
from filelock import FileLock

from mnist_cnn.core.errors import ProjectError, masked, one_line, without_driver_prefix
from mnist_cnn.core.files import is_url
from mnist_cnn.core.params import ConfigError
from mnist_cnn.core.search import SearchParam, TuneConfig
from mnist_cnn.ops.lock import NamedLock

SPACE_ATTR = "mnist_cnn.space"  # study user attr: the first worker's search space, {key: Optuna's JSON}


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
        return _open_journal(storage, path), FileLock(str(path) + ".workers.lock", timeout=LOCK_WAIT_S)
    engine_kwargs = {"connect_args": {"connect_timeout": 5}} if storage.startswith("postgresql") else {}
    try:
        opened = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
    except Exception as exc:  # driver missing, host down, login refused: one line, before any trial
        reason = without_driver_prefix(one_line(exc))
        raise TuneError(f"tune.storage = {masked(storage)!r}: cannot be reached ({reason})") from None
    return opened, database_lock(opened, f"{study_name}.workers-lock")


def _journal_path(storage: str, root: Path) -> Path:
    try:
        given = Path(storage).expanduser()  # `~/studies/x.journal`, as a shell would read it
    except RuntimeError as exc:  # `~nosuchuser/...`, or no home folder
        raise TuneError(f"tune.storage = {storage!r}: cannot expand ~ ({exc})") from None
    return given if given.is_absolute() else root / given


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


def check_space(study: optuna.Study, cfg: TuneConfig) -> None:
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


def record_space(study: optuna.Study, cfg: TuneConfig) -> None:
    """Record ``cfg.space`` as the space the study was made with, unless one is recorded already."""
    if SPACE_ATTR not in study.user_attrs:
        space = {p.key: optuna.distributions.distribution_to_json(distribution(p)) for p in cfg.space}
        study.set_user_attr(SPACE_ATTR, space)
