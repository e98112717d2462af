"""Shared fixtures."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

#: ``respond(path_with_query, headers) -> (status, JSON-serialisable body)``
Responder = Callable[[str, dict[str, str]], tuple[int, object]]


@dataclass
class LocalServer:
    """A JSON web server on 127.0.0.1 that logs the requests it gets."""

    server: ThreadingHTTPServer
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def local_server() -> Iterator[Callable[[Responder], LocalServer]]:
    """Start HTTP servers on 127.0.0.1 (free port, own thread); all are stopped at teardown."""
    started: list[LocalServer] = []

    def start(respond: Responder) -> LocalServer:
        log: list[tuple[str, dict[str, str]]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers = dict(self.headers.items())
                log.append((self.path, headers))
                status, body = respond(self.path, headers)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        server = LocalServer(ThreadingHTTPServer(("127.0.0.1", 0), Handler), log)
        threading.Thread(target=server.server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.server.socket.fileno() != -1:
            server.stop()
