"""params.yaml files of the old, flat layout (``optimizer: adamw``, ``weight_decay: 0.01``, ``lr_gamma``,
``lr_patience``, ``pruner_startup_trials``, ...) read as the nested one: each old key goes under the
setting it belongs to when it acts under the file's choice, and is dropped when it did nothing."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mnist_cnn.core.checks import Choice, ConfigError

log = logging.getLogger(__name__)


# section -> {old key: (the setting it now belongs to, its key there)}
OLD_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "train": {
        "weight_decay": ("optimizer", "weight_decay"),
        "lr_gamma": ("scheduler", "gamma"),
        "lr_patience": ("scheduler", "patience"),
    },
    "tune": {
        "pruner_startup_trials": ("pruner", "startup_trials"),
        "pruner_warmup_epochs": ("pruner", "warmup_epochs"),
    },
}


def new_key(dotted: str) -> str | None:
    """``train.scheduler.gamma`` for the old ``train.lr_gamma``; None for any other key."""
    section, _, name = dotted.partition(".")
    setting, key = OLD_KEYS.get(section, {}).get(name, (None, None))
    return f"{section}.{setting}.{key}" if setting else None


def converted(section: str, raw: Mapping[str, Any], choices: Mapping[str, type[Choice]], source: str) -> dict:
    """``raw`` (one section, as read) in the nested layout; one log line if it held old keys."""
    moves = OLD_KEYS.get(section, {})
    old = [name for name in raw if name in moves]
    if not old:
        return dict(raw)
    nested: dict[str, dict[str, Any]] = {}
    dropped = []
    for name in old:
        setting, key = moves[name]
        chosen = raw.get(setting)
        if isinstance(chosen, Mapping):
            raise ConfigError(
                f"{section}.{name}: a key of the old layout beside the new {section}.{setting} mapping;"
                f" write it as {section}.{setting}.{key}"
            )
        if chosen is None:  # nothing to put it under: the missing choice is what gets reported
            dropped.append(name)
            continue
        entry = nested.setdefault(setting, {"name": chosen})
        if isinstance(chosen, str) and key in choices[setting].TAKES.get(chosen, ()):
            entry[key] = raw[name]
        else:
            dropped.append(name)
    result = {name: nested.get(name, value) for name, value in raw.items() if name not in moves}
    read_as = ", ".join(f"{section}.{setting}: {_flow(entry)}" for setting, entry in nested.items())
    note = f"; dropped, as they did nothing under its choices: {', '.join(dropped)}" if dropped else ""
    log.warning("%s: %s uses the old flat layout (%s); read as %s%s", source, section, ", ".join(old), read_as, note)
    return result


def _flow(entry: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{key}: {value}" for key, value in entry.items()) + "}"
