"""How an exception reads in a one-line error."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message (MLflow's ``.message`` where it has one), or the
    name of its type when the message is empty: tracebacks and multi-line driver errors stay out of
    the single line a user reads."""
    text = str(getattr(exc, "message", exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
