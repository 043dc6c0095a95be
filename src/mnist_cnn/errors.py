"""How an exception, or a URL with a password, reads in a one-line error."""

from __future__ import annotations

import re


def one_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message (MLflow's ``.message`` where it has one), or the
    name of its type when the message is empty: tracebacks and multi-line driver errors stay out of
    the single line a user reads."""
    text = str(getattr(exc, "message", exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def masked(url: str) -> str:
    """``url`` (or a message quoting it) without its password: ``postgresql://bob:***@host/db``.

    The password runs to the last ``@`` of the URL (a URL ends at whitespace), so a raw ``/`` or ``@``
    in it stays hidden too; ``host:port/path@x``, with no password, is left alone."""
    return re.sub(r"(://[^:/@\s]+):(?!\d+(?:[/?#]|$))\S*@", r"\1:***@", url)


def without_driver_prefix(reason: str) -> str:
    """SQLAlchemy's ``(sqlite3.DatabaseError) file is not a database`` without the driver's class."""
    return re.sub(r"^\([\w.]+\) ", "", reason)
