"""A real HTTP server on loopback, in a thread of the test process, answering what a test scripts.

For the clients that must meet real sockets (the reference partner client, `flask firehose send`):
their timeouts, connection handling and headers are what is under test, so no mocked transport.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from flask import Flask, Response, request
from werkzeug.serving import WSGIRequestHandler, make_server


@dataclass
class Answer:
    """One scripted answer: a body other than bytes or text is sent as JSON; `delay` is slept first."""

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedServer:
    """Records every request and answers each with the next scripted Answer, then `default`."""

    def __init__(self, *answers: Answer, default: Answer | None = None) -> None:
        self.answers = list(answers)
        self.default = default or Answer(200, {"ok": True})
        self.received: list[Received] = []
        # Handler threads append while the test thread reads.
        self._lock = threading.Lock()
        self.app = Flask("scripted_server")
        self.app.add_url_rule("/", "any", self._answer, defaults={"path": ""}, methods=["GET", "POST", "PUT", "DELETE"])
        self.app.add_url_rule("/<path:path>", "any_path", self._answer, methods=["GET", "POST", "PUT", "DELETE"])

    def _answer(self, path: str) -> Response:
        with self._lock:
            self.received.append(
                Received(request.method, request.path, dict(request.headers), request.get_data(cache=False))
            )
            answer = self.answers.pop(0) if self.answers else self.default
        if answer.delay:
            time.sleep(answer.delay)
        body = answer.body
        if isinstance(body, bytes | str):
            return Response(body, answer.status, answer.headers)
        return Response(orjson.dumps(body), answer.status, answer.headers, mimetype="application/json")


class _QuietHandler(WSGIRequestHandler):
    # One line per request on stderr is noise in a test's output.
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """Serve `app` on a free loopback port for the duration; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
