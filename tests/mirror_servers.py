"""Real HTTP servers on 127.0.0.1 (a free port each), in a thread of the test's process: a good mirror,
and the ways a mirror fails in the wild (shared by tests/unit/test_download.py and the e2e signal test)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def serving(handler: Callable[..., socketserver.BaseRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free port of 127.0.0.1 in a thread; yield the base URL; stop it on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.stopping = threading.Event()  # handlers that stream slowly give up when it is set
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def mirror_handler(directory: Path) -> Callable[..., socketserver.BaseRequestHandler]:
    """A good mirror: the files of ``directory``."""
    return functools.partial(QuietFiles, directory=str(directory))


def trickle_handler(directory: Path, burst: int = 0, interval: float = 0.5) -> type[QuietHandler]:
    """The files of ``directory``: the first ``burst`` bytes at once, then one byte every ``interval`` s."""

    class Trickle(QuietHandler):
        def do_GET(self) -> None:
            blob = (directory / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            try:
                self.wfile.write(blob[:burst])
                for i in range(burst, len(blob)):
                    # Bounded in time however the test ends: the server's stop event ends it.
                    if self.server.stopping.wait(interval):
                        return
                    self.wfile.write(blob[i : i + 1])
            except OSError:  # the client gave up
                pass
            self.close_connection = True

    return Trickle


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(OSError):  # files come and go under our feet
            if condition():
                return True
        time.sleep(0.05)
    return False
