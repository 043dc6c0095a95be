"""Small network helpers for the servers the project starts: a free port, whether a URL answers."""

from __future__ import annotations

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
