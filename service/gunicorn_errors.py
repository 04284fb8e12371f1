"""Errors gunicorn answers itself (malformed HTTP, over-long request lines or headers), in the
service's one JSON error shape instead of gunicorn's HTML page.

Gunicorn writes those answers through `gunicorn.util.write_error`, before the request ever
reaches Flask; `install()` swaps that function for one that writes the JSON shape.
"""

from __future__ import annotations

import socket

import orjson
from gunicorn import util

from schemas.errors import error_body

_CODES = {
    400: ("bad_request", "Malformed HTTP request."),
    413: ("payload_too_large", "Request too large."),
    414: ("uri_too_long", "Request line too long."),
    431: ("request_header_fields_too_large", "Request headers too large."),
    500: ("internal_error", "Internal error; retry later."),
}


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    # gunicorn's own message can quote the offending request line or header, which may hold a
    # token: answer with a fixed text per status instead.
    code, message = _CODES.get(status_int, ("bad_request", "Malformed HTTP request."))
    body = orjson.dumps(error_body(code, message))
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    util.write_nonblock(sock, head + body)


def install() -> None:
    util.write_error = write_json_error
