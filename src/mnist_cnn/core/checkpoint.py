"""What a checkpoint saves, its fingerprint (params and data it belongs to), and loading it back."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnist_cnn.core import files
from mnist_cnn.core.params import Params, flatten

log = logging.getLogger(__name__)


CHECKPOINT_FORMAT = 4


@dataclass(frozen=True)
class Checkpointing:
    """Where to save a checkpoint after every epoch, what identifies this training, and (``state``) a
    checkpoint of the same training to continue from."""

    path: Path
    fingerprint: str
    run_id: str | None = None
    state: dict[str, Any] | None = None


def training_fingerprint(params: Params, data_md5s: Mapping[str, str], processes: int = 1) -> str:
    """What a checkpoint must match to be continued: every data/model/train value, the data's MD5s and
    the number of processes (each keeps random streams of its own). Plain JSON, not a hash: a
    checkpoint that does not match can then say what changed."""
    values = {
        k: v
        for k, v in flatten(params).items()
        if k.split(".")[0] in ("data", "model", "train") and k != "train.resume"
    }
    return json.dumps(
        {"params": values, "data": dict(sorted(data_md5s.items())), "processes": processes}, sort_keys=True
    )


def fingerprint_difference(old: str, new: str, shown: int = 3) -> str:
    """What differs between two ``training_fingerprint`` values, for a log line."""
    try:
        before, after = json.loads(old), json.loads(new)
        changes = []
        for key in sorted(set(before["params"]) | set(after["params"])):
            if key not in before["params"]:
                changes.append(f"no {key} (a newer param)")
            elif key not in after["params"]:
                changes.append(f"{key} (no longer a param)")
            elif before["params"][key] != after["params"][key]:
                changes.append(f"{key} = {before['params'][key]!r} (now {after['params'][key]!r})")
        if before["data"] != after["data"]:
            changes.append("other data files")
        if before["processes"] != after["processes"]:
            changes.append(f"{before['processes']} processes (now {after['processes']})")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):  # older ones kept a hash
        return "other params or data"
    if not changes:  # the same values written another way
        return "other params or data"
    more = f" and {len(changes) - shown} more" if len(changes) > shown else ""
    return ", ".join(changes[:shown]) + more


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this very training, else None (and a line saying why)."""
    if not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file means "start over", never a crash
        log.warning("%s: unreadable checkpoint (%s); training from scratch", path, type(exc).__name__)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s: not a checkpoint of this version; training from scratch", path)
        return None
    if state.get("fingerprint") != fingerprint:
        difference = fingerprint_difference(str(state.get("fingerprint")), fingerprint)
        log.info("%s: from a training with %s; training from scratch", path, difference)
        return None
    return state


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` atomically. Serialised in memory first: written straight to a full disk, torch
    fails with an internal assertion ("unexpected pos") instead of the OSError that names the cause."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    files.write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
