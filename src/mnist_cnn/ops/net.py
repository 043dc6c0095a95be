"""Small network helpers for the servers the project starts: a free port, whether a URL answers, who listens."""

from __future__ import annotations

import contextlib
import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on at ``host`` right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def answers_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers HTTP 200 within ``timeout`` s (a server's ``/health``, ``/ping``)."""
    import requests  # not at import time: the command line starts faster without it

    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def is_healthy(server_url: str, timeout: float = 2.0) -> bool:
    """Whether an ``mlflow server`` at ``server_url`` answers on ``/health``."""
    return answers_ok(f"{server_url}/health", timeout)


def port_taken(host: str, port: int) -> bool:
    """Whether someone listens on ``host:port`` now (or on all addresses at ``port``): a bind there fails
    with "address in use". Other bind errors (an address not on this machine) are the server's to report."""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # As the servers do: the TIME_WAIT leftovers of a server that just stopped do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def listening_pids(port: int) -> list[int]:
    """The processes holding a LISTEN socket on ``port`` (any address); empty where psutil may not see them."""
    import psutil

    try:
        found = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return []
    return sorted({c.pid for c in found if c.pid and c.status == psutil.CONN_LISTEN and c.laddr.port == port})


def listens_on(process, port: int) -> bool:
    """Whether ``process`` (a ``psutil.Process``) or one of its descendants holds a LISTEN socket on
    ``port``: a server that forks its workers, such as uvicorn under ``mlflow server``."""
    import psutil

    try:
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return False
    for member in family:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in member.net_connections("inet")):
                return True
    return False


def describe_process(pid: int, width: int = 60) -> str:
    """``pid 123 (python3 -m http.server 5000)``: who a pid is, for a message (its command line, cut)."""
    import psutil

    try:
        command = " ".join(psutil.Process(pid).cmdline()) or psutil.Process(pid).name()
    except psutil.Error:
        return f"pid {pid}"
    return f"pid {pid} ({command if len(command) <= width else command[: width - 1] + '…'})"
