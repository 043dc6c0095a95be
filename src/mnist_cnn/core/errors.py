"""The project's errors, and how an error reads: one line for the user, or a traceback for a bug.

An error raised on purpose, with a message meant for the user (bad params, bad data, no network, a
store that refuses), is a ``ProjectError``: the command line prints its first line and exits with its
``exit_code``. Anything else is a bug in the code and keeps its traceback. An outside engine whose
errors are messages for the user (the MLflow server's refusals, a torch.distributed peer gone) is
registered with ``register_user_facing`` by the one package that talks to it.
"""

from __future__ import annotations

import re


class ProjectError(Exception):
    """A failure the user can act on: shown as ``error: <first line>``, exit ``exit_code``."""

    exit_code = 1


_USER_FACING: list[type[BaseException]] = [ProjectError]


def register_user_facing(*types: type[BaseException]) -> None:
    """Show these outside errors as one line too (the package that imports their library calls this)."""
    _USER_FACING.extend(t for t in types if t not in _USER_FACING)


def is_user_facing(exc: BaseException) -> bool:
    return isinstance(exc, tuple(_USER_FACING))


def exit_code(exc: BaseException) -> int:
    return getattr(exc, "exit_code", 1) if isinstance(exc, ProjectError) else 1


def one_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message (MLflow's ``.message`` where it has one), or the
    name of its type when the message is empty: tracebacks and multi-line driver errors stay out of
    the single line a user reads."""
    text = str(getattr(exc, "message", exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def masked(url: str) -> str:
    """``url`` (or a message quoting URLs) without passwords: ``postgresql://bob:***@host/db``.

    The user's part runs to the URL's last ``@`` (a URL ends at whitespace), so a password with a raw
    ``/``, ``@`` or leading digits stays hidden, and so does one with an empty user name (``redis://:pw@h``).
    The price: a URL with no password but an ``@`` after a ``host:port`` (``http://h:5000/a@b``) is masked
    too; a password is never shown."""
    return _URL.sub(_mask_user_part, url)


_URL = re.compile(r"([A-Za-z][\w+.-]*://)(\S*)")


def _mask_user_part(match: re.Match) -> str:
    scheme, rest = match.groups()
    user_part, at, host_part = rest.rpartition("@")
    if not at or user_part.startswith("[") or ":" not in user_part:  # no user part, an IPv6 host, no password
        return match.group(0)
    return f"{scheme}{user_part.split(':', 1)[0]}:***@{host_part}"


def without_driver_prefix(reason: str) -> str:
    """SQLAlchemy's ``(sqlite3.DatabaseError) file is not a database`` without the driver's class."""
    return re.sub(r"^\([\w.]+\) ", "", reason)
