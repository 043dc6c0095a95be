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
