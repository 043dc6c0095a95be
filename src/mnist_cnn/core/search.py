"""Tune's section of params.yaml: the search space, sampler and pruner, checked against the params it searches."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_cnn.core.checks import Choice
from mnist_cnn.core.params import (
    ConfigError,
    Params,
    _check_keys,
    _check_type,
    _read_yaml,
    _require,
    apply_choice_changes,
    choices,
    converted,
    flatten,
    key_kinds,
    new_key,
    parse_value,
    resolve_key,
    with_values,
)

log = logging.getLogger(__name__)


TUNABLE_SECTIONS = ("model", "train")


TUNE_KEYS = (
    "study_name",
    "storage",
    "n_trials",
    "timeout",
    "sampler_seed",
    "pruner",
    "epochs",
    "space",
)


# Keys a trial takes from the worker, not from its sampled values, or whose search is a mistake: searched,
# they would be logged and recommended while every trial trained the same way.
NOT_SEARCHABLE = {
    "train.epochs": "trial epochs are tune.epochs",
    "train.monitor": "the study minimises the validation loss, so trials keep their weights by it",
    "train.device": "every trial trains on the worker's device; set it with --train.device",
    "train.precision": "every trial trains in the worker's precision; set it with --train.precision",
    "train.processes": "each trial trains in one process; start several tune workers instead",
    "train.compile": "it changes the speed, not the validation loss",
    "train.resume": "trials never resume from a checkpoint",
    "train.val_split": "every trial is scored on the same validation split, made once per worker",
    "train.seed": "a seed that happens to score well is luck, not a better configuration",
    "data.split_seed": "trials scored on other validation images would not compare",
}


# Keys a worker sets for itself (its device, its speed): the workers of one study may differ in them.
WORKER_KEYS = ("train.device", "train.precision", "train.compile", "train.resume", "train.processes")


@dataclass(frozen=True)
class SearchParam:
    """One searched key: a range (``low``..``high``, ``log`` scale or not) or a list of ``choices``."""

    key: str  # dotted params.yaml key, e.g. train.lr
    kind: type  # int | float (a range) or object (choices)
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class PrunerConfig(Choice):
    """``tune.pruner``: median (below the median of earlier trials at the same epoch) | hyperband | none."""

    startup_trials: int | None = None  # median: trials finished before any is pruned
    warmup_epochs: int | None = None  # median: epochs a trial runs before it can be pruned
    WHERE = "tune.pruner"
    TAKES = {"median": ("startup_trials", "warmup_epochs"), "hyperband": (), "none": ()}
    DEFAULTS = {"startup_trials": 5, "warmup_epochs": 1}

    def check(self) -> None:
        for key in self.TAKES[self.name]:
            _require(getattr(self, key) >= 0, f"{self.WHERE}.{key}", getattr(self, key), "an integer >= 0")


@dataclass(frozen=True)
class TuneConfig:
    study_name: str
    storage: str  # a journal file (path) or a database URL (postgresql+psycopg://..., sqlite:///...)
    n_trials: int  # the study's total over all workers
    timeout: float | None  # seconds per worker; None: no limit
    sampler_seed: int
    pruner: PrunerConfig
    epochs: int  # train.epochs of every trial
    space: tuple[SearchParam, ...]

    def __post_init__(self) -> None:
        _require(bool(self.study_name.strip()), "tune.study_name", self.study_name, "a non-empty name")
        _require(bool(self.storage.strip()), "tune.storage", self.storage, "a journal file path or a database URL")
        _require(self.n_trials >= 1, "tune.n_trials", self.n_trials, "an integer >= 1")
        _require(self.timeout is None or self.timeout > 0, "tune.timeout", self.timeout, "null or a number > 0")
        _require(self.sampler_seed >= 0, "tune.sampler_seed", self.sampler_seed, "an integer >= 0")
        _require(self.epochs >= 1, "tune.epochs", self.epochs, "an integer >= 1")
        _require(bool(self.space), "tune.space", {}, "at least one model.* or train.* key to search")


MAX_CHECKED_INTS = 1000  # an integer range up to this wide has every value in it checked


def _search_param(key: str, raw: Any, params: Params) -> SearchParam:
    where = f"tune.space.{key}"
    try:
        dotted = resolve_key(key)
    except ConfigError:
        dotted = key
    if dotted in NOT_SEARCHABLE:
        raise ConfigError(f"{where}: not searchable ({NOT_SEARCHABLE[dotted]})")
    if dotted.split(".")[0] not in TUNABLE_SECTIONS or dotted not in key_kinds():
        expected = "expected a model.* or train.* key of params.yaml, e.g. train.lr"
        raise ConfigError(f"{where}: unknown parameter ({_now(dotted) or expected})")
    kind = key_kinds()[dotted]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} = {raw!r}: expected {{low: .., high: .., log: true|false}} or {{choices: [..]}}")
    allowed = {"choices"} if "choices" in raw else {"low", "high", "log"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (expected {', '.join(sorted(allowed))})")

    def valid(value: Any, at: str) -> Any:
        value = _check_type(at, value, kind)
        try:
            with_values(params, {dotted: value})
        except ConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from None
        return value

    if "choices" in raw:
        choices = raw["choices"]
        _require(isinstance(choices, list) and len(choices) >= 1, f"{where}.choices", choices, "a non-empty list")
        return SearchParam(dotted, object, choices=tuple(valid(c, f"{where}.choices") for c in choices))
    _require(kind in (int, float), where, dict(raw), f"choices: {dotted} is not a number")
    for end in ("low", "high"):
        if end not in raw:
            raise ConfigError(f"{where}.{end}: missing key")
    low, high = valid(raw["low"], f"{where}.low"), valid(raw["high"], f"{where}.high")
    log = _check_type(f"{where}.log", raw.get("log", False), bool)
    _require(high > low, f"{where}.high", high, f"a number > low ({low}): an empty or inverted range")
    _require(not log or low > 0, f"{where}.low", low, "a number > 0 with log: true")
    if kind is int and high - low <= MAX_CHECKED_INTS:
        # A key with a few allowed values (model.kernel_size: 3 or 5) must not fail at a trial that draws 4.
        for value in range(low + 1, high):
            valid(value, f"{where} (low..high holds {value}; list the allowed values as choices)")
    return SearchParam(dotted, kind, low=low, high=high, log=log)


def _check_searched_settings(space: tuple[SearchParam, ...], params: Params) -> None:
    """A setting's key searched with the setting's name (``train.optimizer.weight_decay`` with
    ``train.optimizer: {choices: [...]}``) must act under every name searched: else trials fail."""
    for param in space:
        section, setting, *key = param.key.split(".")
        cls = choices(type(getattr(params, section))).get(setting)
        if cls is None or key in ([], ["name"]):
            continue
        for named in space:
            if named.key in (f"{section}.{setting}", f"{section}.{setting}.name"):
                takers = [name for name, keys in cls.TAKES.items() if key[0] in keys]
                for name in named.choices:
                    if name not in takers:
                        raise ConfigError(
                            f"tune.space.{param.key}: {name} (a choice of tune.space.{named.key}) takes no"
                            f" {key[0]}; search them together only with names that take it ({', '.join(takers)})"
                        )


def parse_tune(
    raw: Any, params: Params, overrides: Mapping[str, Any] | None = None, source: str = "params"
) -> TuneConfig:
    """Validate the ``tune`` section (after ``overrides`` such as ``{"tune.n_trials": "4"}``); the searched
    values are checked against ``params`` (a dropout range must stay in [0, 1))."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"tune: expected a mapping of keys, got {raw!r}")
    raw = converted("tune", raw, choices(TuneConfig), source)
    changes: dict[str, dict[str, Any]] = {}
    for key, value in (overrides or {}).items():
        name = key.removeprefix("tune.")
        setting, _, key_in_setting = name.partition(".")
        if setting in choices(TuneConfig) and key_in_setting in ("", "name", *PrunerConfig.keys()):
            changes.setdefault(setting, {})[key_in_setting] = parse_value(value)
            continue
        if name not in TUNE_KEYS or name == "space":
            expected = f"expected one of tune.{', tune.'.join(TUNE_KEYS[:-1])}, tune.pruner.KEY"
            raise ConfigError(f"{key}: unknown parameter ({_now(f'tune.{name}') or expected})")
        raw[name] = parse_value(value)
    apply_choice_changes(TuneConfig, "tune", raw, changes, source)
    _check_keys("tune", raw, TUNE_KEYS)
    # Trials train one after another in this process: torchrun is never started, so N would be ignored.
    processes = params.train.processes
    _require(
        processes == 1,
        "train.processes",
        processes,
        "1 for tune (each trial trains in one process; start several tune workers to use more)",
    )
    space = raw["space"]
    if not isinstance(space, Mapping):
        raise ConfigError(f"tune.space = {space!r}: expected a mapping of params.yaml keys to ranges")
    timeout = raw["timeout"]
    values = {
        "study_name": _check_type("tune.study_name", raw["study_name"], str),
        "storage": _check_type("tune.storage", raw["storage"], str),
        "n_trials": _check_type("tune.n_trials", raw["n_trials"], int),
        "timeout": None if timeout is None else _check_type("tune.timeout", timeout, float),
        "sampler_seed": _check_type("tune.sampler_seed", raw["sampler_seed"], int),
        "pruner": PrunerConfig.parse(raw["pruner"]),
        "epochs": _check_type("tune.epochs", raw["epochs"], int),
        "space": tuple(_search_param(str(k), v, params) for k, v in space.items()),
    }
    keys = [_setting_name(p.key, params) for p in values["space"]]
    for key in keys:
        _require(keys.count(key) == 1, "tune.space", list(space), f"each key once ({key} is given twice)")
    _check_searched_settings(values["space"], params)
    for key, param in zip(space, values["space"], strict=True):
        # One value is no search: every trial would train the same configuration.
        _require(
            not param.choices or len(set(map(repr, param.choices))) >= 2,
            f"tune.space.{key}.choices",
            list(param.choices),
            f"two or more different values (to train with one, set {param.key} in params.yaml)",
        )
    return TuneConfig(**values)


def fixed_params(params: Params, cfg: TuneConfig) -> dict[str, Any]:
    """What every trial of the study trains with besides its sampled values: ``tune.epochs`` and the
    data, model and train keys that are not searched (a searched setting's own keys neither), nor a
    worker's own (``WORKER_KEYS``). Trials trained with other ones are another study."""
    searched = [p.key.removesuffix(".name") for p in cfg.space]
    fixed: dict[str, Any] = {"tune.epochs": cfg.epochs}
    for key, value in flatten(params).items():
        if key.split(".")[0] not in ("data", *TUNABLE_SECTIONS) or key in (*WORKER_KEYS, *TRIAL_KEYS):
            continue
        if not any(key == s or key.startswith(f"{s}.") for s in searched):
            fixed[key] = value
    return fixed


TRIAL_KEYS = ("train.epochs", "train.monitor")  # set for every trial by the tune stage (tune.epochs, val_loss)


def _now(dotted: str) -> str | None:
    """Where a key of the old flat layout went: ``now train.scheduler.gamma, where it acts``."""
    return f"now {new_key(dotted)}, where it acts" if new_key(dotted) else None


def _setting_name(key: str, params: Params) -> str:
    """``train.optimizer`` for ``train.optimizer.name`` too: two ways of writing one key."""
    section, _, name = key.removesuffix(".name").partition(".")
    return f"{section}.{name}" if name in choices(type(getattr(params, section))) else key


def load_tune(path: Path, params: Params, overrides: Mapping[str, Any] | None = None) -> TuneConfig:
    """Read and validate ``params.yaml``'s ``tune`` section."""
    raw = _read_yaml(path)
    try:
        if not isinstance(raw, Mapping) or "tune" not in raw:
            raise ConfigError("tune: missing section")
        return parse_tune(raw["tune"], params, overrides, str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
