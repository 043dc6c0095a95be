"""The checks every section of params.yaml shares (``ConfigError``, types, ranges, keys), and settings
chosen by name (``train.optimizer``, ``train.scheduler``, ``tune.pruner``), each taking only the keys
that act under its name: a setting that would be ignored cannot be written, logged or fingerprinted."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, get_args, get_type_hints

from mnist_cnn.core.errors import ProjectError


class ConfigError(ProjectError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""

    exit_code = 2


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


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


@dataclass(frozen=True)
class Choice:
    """A setting chosen by ``name`` whose other keys act under some names only (``TAKES``). A key that
    acts under the name and is not given takes its default (``DEFAULTS``); one that does not act is
    None here and refused in params.yaml. Written as a mapping (``{name: plateau, patience: 3}``) or,
    keys left at their defaults, as the bare name (``plateau``)."""

    name: str
    WHERE: ClassVar[str] = ""  # the params.yaml key, e.g. train.optimizer
    TAKES: ClassVar[Mapping[str, tuple[str, ...]]] = {}  # name -> the keys that act under it
    DEFAULTS: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self) -> None:
        _require(self.name in self.TAKES, f"{self.WHERE}.name", self.name, " | ".join(self.TAKES))
        for key in self.keys():
            value = getattr(self, key)
            if key not in self.TAKES[self.name]:
                if value is not None:
                    raise ConfigError(self.not_taken(self.name, key, value))
            elif value is None:
                object.__setattr__(self, key, self.DEFAULTS[key])
        self.check()

    def check(self) -> None:
        """The ranges of the keys that act (a subclass's)."""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "name")

    @classmethod
    def kind(cls, key: str) -> type:
        """``float`` for ``weight_decay: float | None``."""
        hint = get_type_hints(cls)[key]
        return next((t for t in get_args(hint) if t is not type(None)), hint)

    @classmethod
    def not_taken(cls, name: str, key: str, value: Any) -> str:
        takers = [n for n, keys in cls.TAKES.items() if key in keys]
        does = f" ({' and '.join(takers)} {'does' if len(takers) == 1 else 'do'})" if takers else ""
        allowed = ", ".join(("name", *cls.TAKES[name]))
        return f"{cls.WHERE}.{key} = {value!r}: {name} takes no {key}{does}; allowed under {name}: {allowed}"

    @classmethod
    def parse(cls, raw: Any) -> Choice:
        """A name, or a mapping with a name and only keys that act under it; types checked."""
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, Mapping):
            names = " | ".join(cls.TAKES)
            raise ConfigError(f"{cls.WHERE} = {raw!r}: expected a name ({names}) or a mapping with a name")
        if "name" not in raw:
            raise ConfigError(f"{cls.WHERE}.name: missing key")
        name = _check_type(f"{cls.WHERE}.name", raw["name"], str)
        _require(name in cls.TAKES, f"{cls.WHERE}.name", name, " | ".join(cls.TAKES))
        for key, value in raw.items():
            if key != "name" and key not in cls.TAKES[name]:
                raise ConfigError(cls.not_taken(name, str(key), value))
        return cls(name, **{k: _check_type(f"{cls.WHERE}.{k}", v, cls.kind(k)) for k, v in raw.items() if k != "name"})

    def as_raw(self) -> dict[str, Any]:
        """``{"name": ..., key: value, ...}``: the name and the keys that act, as params.yaml writes them."""
        return {"name": self.name, **{key: getattr(self, key) for key in self.TAKES[self.name]}}

    def __str__(self) -> str:  # a YAML flow mapping, or the bare name: a value --KEY takes back
        raw = self.as_raw()
        return self.name if len(raw) == 1 else "{" + ", ".join(f"{k}: {v}" for k, v in raw.items()) + "}"

    @classmethod
    def changed(cls, raw: Any, changes: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """``raw`` (a name or a mapping, as params.yaml holds it) with ``changes`` applied: ``{"": "adamw"}``
        or ``{"name": "adamw"}`` names another choice, ``{"": {...}}`` replaces it all, ``{"gamma": 0.5}`` sets
        one key. When the name changes, the keys of ``raw`` that do not act under the new one are dropped
        (they would be refused) and returned; keys from ``changes`` are kept, and refused if they do not act."""
        before = {"name": raw} if isinstance(raw, str) else dict(raw) if isinstance(raw, Mapping) else raw
        after = dict(before) if isinstance(before, dict) else before
        given: set[str] = set()
        for key, value in changes.items():
            if key == "" and not isinstance(value, str):
                after = dict(value) if isinstance(value, Mapping) else value
                given = set(after) if isinstance(after, Mapping) else set()
                continue
            if not isinstance(after, dict):
                after = {}
            after[key or "name"] = value
            given.add(key or "name")
        if not isinstance(before, dict) or not isinstance(after, dict):
            return after, {}
        name = after.get("name")
        if name == before.get("name") or name not in cls.TAKES:
            return after, {}
        dropped = {k: v for k, v in after.items() if k != "name" and k not in given and k not in cls.TAKES[name]}
        return {k: v for k, v in after.items() if k not in dropped}, dropped
