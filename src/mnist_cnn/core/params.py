"""Typed, validated parameters loaded from ``params.yaml`` (the one source of defaults)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from mnist_cnn.core.errors import ProjectError, one_line

DATASETS = ("mnist", "fashion-mnist")


DEVICES = ("auto", "cpu", "cuda", "mps")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


COMPILE_MODES = ("none", "default", "reduce-overhead")  # reduce-overhead: torch.compile with CUDA graphs


SCHEDULERS = ("step", "plateau", "onecycle", "constant")


OPTIMIZERS = ("adadelta", "adamw", "sgd")


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


class ConfigError(ProjectError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""

    exit_code = 2


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but floats as YAML 1.2 (and every other tool) reads them.

    PyYAML implements YAML 1.1, where ``1e-3`` (no dot) is a string; users write ``lr: 1e-3``.
    A key given twice in one mapping is refused, as DVC refuses the same file (PyYAML keeps the last).
    """

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the file's own keys, before construction: merging rewrites anchored mappings in place.
        _refuse_duplicate_keys(node, set())
        return super().construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, seen: set[int]) -> None:
    """Each mapping's keys as written (``<<`` counts too: two merges in one mapping are refused, as DVC
    refuses them); an aliased node is checked once."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key_node.value!r} (first on line {first_line[key]})",
                        problem_mark=key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line + 1
            _refuse_duplicate_keys(value_node, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, seen)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, "data.dataset", self.dataset, " | ".join(DATASETS))


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
class TrainConfig:
    batch_size: int
    epochs: int
    optimizer: str
    lr: float
    weight_decay: float
    scheduler: str
    lr_gamma: float
    lr_patience: int
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
        _require(self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, " | ".join(OPTIMIZERS))
        _require(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _require(self.scheduler in SCHEDULERS, "train.scheduler", self.scheduler, " | ".join(SCHEDULERS))
        _require(0 < self.lr_gamma <= 1, "train.lr_gamma", self.lr_gamma, "a number in (0, 1]")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        _require(0 <= self.weight_decay < 1, "train.weight_decay", self.weight_decay, "a number in [0, 1)")
        _require(self.lr_patience >= 0, "train.lr_patience", self.lr_patience, "an integer >= 0")
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

    def __post_init__(self) -> None:
        for name in ("experiment", "registered_model"):
            value = getattr(self, name)
            _require(bool(value.strip()), f"mlflow.{name}", value, "a non-empty name")
        _require(len(self.preset) <= 250, "mlflow.preset", self.preset, "a name of at most 250 characters")


@dataclass(frozen=True)
class Params:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    mlflow: MlflowConfig


def _check_type(key: str, value: Any, kind: type) -> Any:
    """Return ``value`` as ``kind``; ints are accepted where floats are expected, nothing else is coerced."""
    if kind is bool:
        _require(isinstance(value, bool), key, value, "true or false")
    elif kind is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
    elif kind is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        _require(math.isfinite(value), key, value, "a finite number")
        return float(value)
    elif kind is str:
        _require(isinstance(value, str), key, value, "a string")
    return value


def _check_keys(section: str, raw: Mapping[str, Any], names: Sequence[str]) -> None:
    """Every key of ``names`` present in ``raw``, and nothing else."""
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (expected one of {', '.join(names)})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}: missing key")


def _build_section(cls: type, section: str, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    _check_keys(section, raw, names)
    values = {n: _check_type(f"{section}.{n}", raw[n], hints[n]) for n in names}
    return cls(**values)


def _merge(raw: Any, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params: expected a mapping of sections, got {raw!r}")
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for key, value in (overrides or {}).items():
        section, name = resolve_key(key).split(".", 1)
        if not isinstance(merged.get(section), dict):
            raise ConfigError(f"{section}: missing section")
        merged[section][name] = parse_value(value)
    return merged


def _section(merged: dict[str, Any], name: str) -> Any:
    if name not in merged:
        raise ConfigError(f"{name}: missing section")
    return _build_section(get_type_hints(Params)[name], name, merged[name])


def parse_params(raw: Any, overrides: Mapping[str, Any] | None = None) -> Params:
    """Validate a params mapping (as read from YAML), after applying ``overrides`` (dotted or short keys)."""
    merged = _merge(raw, overrides)
    return Params(**{f.name: _section(merged, f.name) for f in fields(Params)})


def _read_yaml(path: Path) -> Any:
    path = Path(path)
    try:
        return yaml_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a params YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read params file ({getattr(exc, 'strerror', None) or exc})") from None
    except yaml.YAMLError as exc:
        # PyYAML's first line is the context ("while scanning ..."); the problem and its place say more.
        problem = getattr(exc, "problem", None) or one_line(exc)
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        # An unclosed quote or bracket is found at the end of the file; where it opened says more.
        start = getattr(exc, "context_mark", None)
        if start is not None and mark is not None and start.line != mark.line and exc.context:
            where += f"; {exc.context} at line {start.line + 1} column {start.column + 1}"
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None


def load_params(path: Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate ``params.yaml``; errors name the file and the key."""
    raw = _read_yaml(path)
    try:
        return parse_params(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_section(path: Path, name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """Read ``params.yaml`` and validate one section only: a stage checks what it reads, so a bad
    ``train.lr`` does not stop the download stage."""
    raw = _read_yaml(path)
    try:
        return _section(_merge(raw, overrides), name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_key(key: str) -> str:
    """Map a short name (``lr``) or dotted name (``train.lr``) to its dotted params key."""
    key = key.strip().lstrip("-")
    dotted = ALIASES.get(key, key)
    hints = get_type_hints(Params)
    section, _, name = dotted.partition(".")
    if section not in hints or name not in {f.name for f in fields(hints[section])}:
        known = ", ".join(sorted(ALIASES))
        raise ConfigError(f"{key}: unknown parameter (expected a dotted key such as train.lr, or one of {known})")
    return dotted


def parse_value(value: Any) -> Any:
    """Values from the command line arrive as strings; read them as YAML scalars (``0.2`` -> 0.2)."""
    if not isinstance(value, str):
        return value
    try:
        return yaml_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value


def flatten(params: Params) -> dict[str, Any]:
    """``{"train.lr": 0.43, ...}``: the keys MLflow logs and ``dvc exp run -S`` takes."""
    return {
        f"{section}.{name}": value
        for section, values in dataclasses.asdict(params).items()
        for name, value in values.items()
    }


def with_values(params: Params, values: Mapping[str, Any]) -> Params:
    """``params`` with ``{"train.lr": 0.1, ...}`` replaced, validated as params.yaml's values are."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = resolve_key(key).split(".", 1)
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(
        params, **{s: dataclasses.replace(getattr(params, s), **changes) for s, changes in sections.items()}
    )
