"""Typed, validated parameters loaded from ``params.yaml`` (the one source of defaults)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from mnist_cnn.core.checks import Choice
from mnist_cnn.core.checks import ConfigError as ConfigError  # re-exported: imported from here
from mnist_cnn.core.checks import _check_keys as _check_keys
from mnist_cnn.core.checks import _check_type as _check_type
from mnist_cnn.core.checks import _require as _require
from mnist_cnn.core.params_compat import converted, new_key
from mnist_cnn.core.params_yaml import _read_yaml as _read_yaml
from mnist_cnn.core.params_yaml import yaml_load as yaml_load

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist")


DEVICES = ("auto", "cpu", "cuda", "mps")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


COMPILE_MODES = ("none", "default", "reduce-overhead")  # reduce-overhead: torch.compile with CUDA graphs


MONITORS = ("val_loss", "val_acc")  # what early stopping and the kept weights go by


RESUME_MODES = ("auto", "never")  # auto: continue from models/checkpoint.pt when it matches the params


# The seed's short option names (and `mlflow run -P` names) mapped to their params.yaml keys.
ALIASES = {
    "dataset": "data.dataset",
    "hidden_1": "model.hidden_1",
    "hidden_2": "model.hidden_2",
    "hidden_3": "model.hidden_3",
    "dropout1": "model.dropout1",
    "dropout2": "model.dropout2",
    "batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "val_split": "train.val_split",
    "patience": "train.patience",
    "seed": "train.seed",
    "device": "train.device",
    "precision": "train.precision",
    "test_batch_size": "evaluate.batch_size",
}


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    split_seed: int
    drop_test_duplicates: bool

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, "data.dataset", self.dataset, " | ".join(DATASETS))
        _require(self.split_seed >= 0, "data.split_seed", self.split_seed, "an integer >= 0")


@dataclass(frozen=True)
class ModelConfig:
    hidden_1: int
    hidden_2: int
    hidden_3: int
    dropout1: float
    dropout2: float
    batchnorm: bool
    # Defaults, unlike the other keys: models registered before they existed are rebuilt without them.
    padding: int = 0
    kernel_size: int = 3
    dilation: int = 1

    def __post_init__(self) -> None:
        _require(self.padding in (0, 1), "model.padding", self.padding, "0 (the seed's) or 1")
        _require(self.kernel_size in (3, 5), "model.kernel_size", self.kernel_size, "3 (the seed's) or 5")
        _require(self.dilation in (1, 2), "model.dilation", self.dilation, "1 (the seed's) or 2")
        for name in ("hidden_1", "hidden_2", "hidden_3"):
            value = getattr(self, name)
            _require(value >= 1, f"model.{name}", value, "an integer >= 1")
        for name in ("dropout1", "dropout2"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"model.{name}", value, "a number in [0, 1)")


@dataclass(frozen=True)
class OptimizerConfig(Choice):
    """``train.optimizer``: adadelta (pytorch/examples') | adamw | sgd (Nesterov, momentum 0.9)."""

    weight_decay: float | None = None  # adamw's decoupled weight decay
    WHERE = "train.optimizer"
    TAKES = {"adadelta": (), "adamw": ("weight_decay",), "sgd": ()}
    DEFAULTS = {"weight_decay": 0.01}  # torch's AdamW default

    def check(self) -> None:
        if self.weight_decay is not None:
            _require(0 <= self.weight_decay < 1, f"{self.WHERE}.weight_decay", self.weight_decay, "a number in [0, 1)")


@dataclass(frozen=True)
class SchedulerConfig(Choice):
    """``train.scheduler``: step (every epoch) | plateau (when ``train.monitor`` stalls) | onecycle | constant."""

    gamma: float | None = None  # the lr's factor: every epoch (step) or per stall (plateau)
    patience: int | None = None  # plateau: epochs no better before the lr is cut
    WHERE = "train.scheduler"
    TAKES = {"step": ("gamma",), "plateau": ("gamma", "patience"), "onecycle": (), "constant": ()}
    DEFAULTS = {"gamma": 0.7, "patience": 2}  # pytorch/examples' 0.7

    def check(self) -> None:
        if self.gamma is not None:
            _require(0 < self.gamma <= 1, f"{self.WHERE}.gamma", self.gamma, "a number in (0, 1]")
        if self.patience is not None:
            _require(self.patience >= 0, f"{self.WHERE}.patience", self.patience, "an integer >= 0")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int
    epochs: int
    lr: float  # every optimizer's (onecycle's peak)
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    label_smoothing: float
    val_split: float
    patience: int
    monitor: str
    seed: int
    device: str
    precision: str
    compile: str
    resume: str
    augment_shift: float
    augment_rotate: float
    augment_scale: float
    augment_shear: float
    augment_erase: float
    augment_elastic: float
    augment_elastic_sigma: float
    augment_clean_epochs: int
    ema_decay: float
    processes: int

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        _require(0 < self.val_split < 1, "train.val_split", self.val_split, "a number in (0, 1)")
        _require(self.patience >= 1, "train.patience", self.patience, "an integer >= 1")
        _require(self.monitor in MONITORS, "train.monitor", self.monitor, " | ".join(MONITORS))
        _require(self.seed >= 0, "train.seed", self.seed, "an integer >= 0")
        _require(self.device in DEVICES, "train.device", self.device, " | ".join(DEVICES))
        _require(self.precision in PRECISIONS, "train.precision", self.precision, " | ".join(PRECISIONS))
        _require(self.compile in COMPILE_MODES, "train.compile", self.compile, " | ".join(COMPILE_MODES))
        _require(self.resume in RESUME_MODES, "train.resume", self.resume, " | ".join(RESUME_MODES))
        _require(0 <= self.augment_shift <= 14, "train.augment_shift", self.augment_shift, "pixels in [0, 14]")
        _require(0 <= self.augment_rotate <= 180, "train.augment_rotate", self.augment_rotate, "degrees in [0, 180]")
        _require(0 <= self.augment_scale < 1, "train.augment_scale", self.augment_scale, "a number in [0, 1)")
        _require(0 <= self.augment_shear <= 45, "train.augment_shear", self.augment_shear, "degrees in [0, 45]")
        _require(0 <= self.augment_erase <= 1, "train.augment_erase", self.augment_erase, "a probability in [0, 1]")
        _require(0 <= self.augment_elastic <= 100, "train.augment_elastic", self.augment_elastic, "pixels in [0, 100]")
        _require(
            0 < self.augment_elastic_sigma <= 14,
            "train.augment_elastic_sigma",
            self.augment_elastic_sigma,
            "pixels in (0, 14]",
        )
        _require(
            self.augment_clean_epochs >= 0, "train.augment_clean_epochs", self.augment_clean_epochs, "an integer >= 0"
        )
        _require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "a number in [0, 1) (0: off)")
        _require(self.processes >= 1, "train.processes", self.processes, "an integer >= 1")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    tta: bool  # test-time augmentation: average the image's and its four one-pixel shifts' probabilities

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str
    registered_model: str
    preset: str  # the tag `preset` on training runs (e.g. augmented); "" for none
    promote_alpha: float  # a new version takes the champion alias only if McNemar's p-value is below it

    def __post_init__(self) -> None:
        for name in ("experiment", "registered_model"):
            value = getattr(self, name)
            _require(bool(value.strip()), f"mlflow.{name}", value, "a non-empty name")
        _require(0 < self.promote_alpha <= 1, "mlflow.promote_alpha", self.promote_alpha, "a number in (0, 1]")
        _require(len(self.preset) <= 250, "mlflow.preset", self.preset, "a name of at most 250 characters")


PROMOTE_ALPHA = 0.05  # params.yaml's, for files written before the key existed


@dataclass(frozen=True)
class Params:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    mlflow: MlflowConfig


def _build_section(cls: type, section: str, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    _check_keys(section, raw, names)
    values = {
        n: hints[n].parse(raw[n]) if _is_choice(hints[n]) else _check_type(f"{section}.{n}", raw[n], hints[n])
        for n in names
    }
    return cls(**values)


def _is_choice(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Choice)


def choices(cls: type) -> dict[str, type[Choice]]:
    """A section's settings chosen by name: ``{"optimizer": OptimizerConfig, ...}``."""
    return {name: kind for name, kind in get_type_hints(cls).items() if _is_choice(kind)}


def apply_choice_changes(
    cls: type, section: str, raw: dict[str, Any], changes: Mapping[str, Mapping[str, Any]], source: str
) -> None:
    """``changes`` (``{"optimizer": {"": "adamw"}, "scheduler": {"gamma": 0.5}}``) into ``raw``, one section;
    the keys the file gave that do not act under a name an override chose are dropped, in a log line."""
    for name, change in changes.items():
        raw[name], dropped = choices(cls)[name].changed(raw.get(name), change)
        if dropped:
            listed = ", ".join(f"{section}.{name}.{k} = {v!r}" for k, v in dropped.items())
            chosen, keys = raw[name].get("name"), ", ".join(dropped)
            log.warning("%s: %s dropped: %s, chosen by an override, takes no %s", source, listed, chosen, keys)


def _merge(raw: Any, overrides: Mapping[str, Any] | None, source: str = "params", only: str | None = None) -> dict:
    """``raw`` with ``overrides`` applied; a section of the old flat layout is read as the nested one
    (``only``: the one section to be read, the others are left as they are)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params: expected a mapping of sections, got {raw!r}")
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for section, cls in get_type_hints(Params).items():
        if choices(cls) and isinstance(merged.get(section), dict) and only in (None, section):
            merged[section] = converted(section, merged[section], choices(cls), source)
    data, train = merged.get("data"), merged.get("train")
    if isinstance(data, dict) and "split_seed" not in data:
        # A file older than data.split_seed cut its split with the training's seed: it keeps its split.
        data["split_seed"] = train.get("seed", 1) if isinstance(train, dict) else 1
    if isinstance(data, dict):  # older files trained on every image of the training file
        data.setdefault("drop_test_duplicates", False)
    if isinstance(merged.get("mlflow"), dict):  # older files promoted on any lead: now a tested one
        merged["mlflow"].setdefault("promote_alpha", PROMOTE_ALPHA)
    changes: dict[str, dict[str, dict[str, Any]]] = {}
    for key, value in (overrides or {}).items():
        section, name, *key_in_choice = resolve_key(key).split(".")
        if not isinstance(merged.get(section), dict):
            raise ConfigError(f"{section}: missing section")
        if name in choices(get_type_hints(Params)[section]):
            changes.setdefault(section, {}).setdefault(name, {})["".join(key_in_choice)] = parse_value(value)
        else:
            merged[section][name] = parse_value(value)
    for section, section_changes in changes.items():
        apply_choice_changes(get_type_hints(Params)[section], section, merged[section], section_changes, source)
    return merged


def _section(merged: dict[str, Any], name: str) -> Any:
    if name not in merged:
        raise ConfigError(f"{name}: missing section")
    return _build_section(get_type_hints(Params)[name], name, merged[name])


def parse_params(raw: Any, overrides: Mapping[str, Any] | None = None, source: str = "params") -> Params:
    """Validate a params mapping (as read from YAML), after applying ``overrides`` (dotted or short keys)."""
    merged = _merge(raw, overrides, source)
    return Params(**{f.name: _section(merged, f.name) for f in fields(Params)})


def load_params(path: Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate ``params.yaml``; errors name the file and the key."""
    raw = _read_yaml(path)
    try:
        return parse_params(raw, overrides, str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_section(path: Path, name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """Read ``params.yaml`` and validate one section only: a stage checks what it reads, so a bad
    ``train.lr`` does not stop the download stage."""
    raw = _read_yaml(path)
    try:
        return _section(_merge(raw, overrides, str(path), only=name), name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_key(key: str) -> str:
    """Map a short name (``lr``) or dotted name (``train.lr``, ``train.scheduler.gamma``) to its dotted
    params key."""
    key = key.strip().lstrip("-")
    dotted = ALIASES.get(key, key)
    if dotted not in key_kinds():
        if new_key(dotted):  # a key of the old flat layout
            raise ConfigError(f"{key}: unknown parameter (now {new_key(dotted)}, where it acts)")
        known = ", ".join(sorted(ALIASES))
        raise ConfigError(f"{key}: unknown parameter (expected a dotted key such as train.lr, or one of {known})")
    return dotted


@functools.cache
def key_kinds(cls: type = Params, prefix: str = "") -> dict[str, type]:
    """Every dotted key an override or a search may name, and its value's type: ``train.lr`` (float),
    ``train.optimizer`` (a name: str, as ``train.optimizer.name``), ``train.optimizer.weight_decay`` (float)."""
    kinds: dict[str, type] = {}
    for name, kind in get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind) and not _is_choice(kind):
            kinds.update(key_kinds(kind, f"{prefix}{name}."))
        elif _is_choice(kind):
            kinds[f"{prefix}{name}"] = str
            kinds.update({f"{prefix}{name}.{key}": kind.kind(key) for key in ("name", *kind.keys())})
        else:
            kinds[f"{prefix}{name}"] = kind
    return kinds


def parse_value(value: Any) -> Any:
    """Values from the command line arrive as strings; read them as YAML scalars (``0.2`` -> 0.2)."""
    if not isinstance(value, str):
        return value
    try:
        return yaml_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.43, "train.optimizer.name": "adadelta", ...}``: the keys MLflow logs, the checkpoint's
    fingerprint holds and ``dvc exp run -S`` takes; a setting's keys only where they act."""
    flat: dict[str, Any] = {}
    for field in fields(params):
        value = getattr(params, field.name)
        if isinstance(value, Choice):
            flat.update({f"{prefix}{field.name}.{key}": v for key, v in value.as_raw().items()})
        elif dataclasses.is_dataclass(value):
            flat.update(flatten(value, f"{prefix}{field.name}."))
        else:
            flat[f"{prefix}{field.name}"] = value
    return flat


def with_values(params: Params, values: Mapping[str, Any]) -> Params:
    """``params`` with ``{"train.lr": 0.1, "train.optimizer": "adamw", ...}`` replaced, validated as
    params.yaml's values are; a setting chosen by another name drops the keys that do not act under it."""
    sections: dict[str, dict[str, Any]] = {}
    settings: dict[str, dict[str, dict[str, Any]]] = {}
    for key, value in values.items():
        section, name, *key_in_choice = resolve_key(key).split(".")
        if name in choices(type(getattr(params, section))):
            settings.setdefault(section, {}).setdefault(name, {})["".join(key_in_choice)] = value
        else:
            sections.setdefault(section, {})[name] = value
    for section, changes in settings.items():
        for name, change in changes.items():
            setting = getattr(getattr(params, section), name)
            raw, _ = type(setting).changed(setting.as_raw(), change)
            sections.setdefault(section, {})[name] = type(setting).parse(raw)
    return dataclasses.replace(
        params, **{s: dataclasses.replace(getattr(params, s), **changes) for s, changes in sections.items()}
    )
