"""Reading a request body under gunicorn (service/body.py), in process: a real loopback TCP
connection read through gunicorn's own body reader, in the environ gunicorn builds
(the socket as gunicorn.socket, wsgi.input_terminated set)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from flask import Request
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader
from werkzeug.test import EnvironBuilder

from common.config import Settings
from service import body as body_module
from service import create_app
from service.body import read_body, read_sized_body
from service.errors import ApiError

Connection = tuple[socket.socket, socket.socket]


@pytest.fixture
def connection() -> Iterator[Connection]:
    """(the server's end, the client's end) of one TCP connection on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def _environ(server: socket.socket, length: int, **headers: str) -> dict[str, Any]:
    environ = EnvironBuilder(method="POST", path="/firehose", headers=headers).get_environ()
    environ.update(
        {
            "CONTENT_LENGTH": str(length),
            "CONTENT_TYPE": "application/json",
            "wsgi.input": Body(LengthReader(SocketUnreader(server), length)),
            "wsgi.input_terminated": True,
            "gunicorn.socket": server,
        }
    )
    return environ


def _reset(client: socket.socket) -> None:
    # Linger 0: close sends a reset, not an orderly end.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def test_the_whole_body_is_read_and_the_socket_timeout_restored(connection: Connection) -> None:
    server, client = connection
    server.settimeout(30.0)
    client.sendall(b"x" * 100)
    assert read_body(Request(_environ(server, 100)), timeout_seconds=1.0) == b"x" * 100
    assert server.gettimeout() == 30.0


def test_a_client_that_stops_sending_is_a_408(connection: Connection) -> None:
    server, client = connection
    client.sendall(b"x" * 10)  # of 100 announced
    with pytest.raises(ApiError) as info:
        read_body(Request(_environ(server, 100)), timeout_seconds=0.1)
    assert (info.value.status, info.value.code) == (408, "request_timeout")
    # The worker's socket goes back to blocking for gunicorn's own use.
    assert server.gettimeout() is None


def test_a_connection_reset_mid_body_is_a_400(connection: Connection) -> None:
    server, client = connection
    client.sendall(b"x" * 10)
    _reset(client)
    with pytest.raises(ApiError) as info:
        read_body(Request(_environ(server, 100)), timeout_seconds=1.0)
    assert (info.value.status, info.value.code) == (400, "invalid_body")
    assert "ConnectionResetError" in info.value.message


def test_a_stalled_body_under_the_size_limit_is_still_a_408(connection: Connection) -> None:
    server, client = connection
    client.sendall(b"x" * 10)
    with pytest.raises(ApiError) as info:
        read_body(Request(_environ(server, 100)), timeout_seconds=0.1, max_bytes=1000)
    assert info.value.status == 408


def test_the_endpoint_answers_a_stalled_body_with_408(connection: Connection, redis_url: str) -> None:
    app = create_app(
        Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=("t",), body_read_timeout_seconds=0.1)
    )
    server, client = connection
    client.sendall(b"{" * 10)
    answer: list[str] = []
    chunks = app.wsgi_app(
        _environ(server, 100, Authorization="Token t"), lambda status, headers, exc_info=None: answer.append(status)
    )
    body = orjson.loads(b"".join(chunks))
    assert (answer, body["error"]["code"]) == (["408 REQUEST TIMEOUT"], "request_timeout")


@pytest.fixture
def buffered() -> Iterator[None]:
    """As under the web's own worker class: every body is whole before the app reads it."""
    body_module.bodies_buffered_by_server()
    try:
        yield
    finally:
        body_module._buffered_by_server = False


def test_a_buffered_body_is_read_whole_and_checked_against_the_limit(connection: Connection, buffered: None) -> None:
    server, client = connection
    payload = orjson.dumps({"type": "x", "pad": "p" * 70_000})
    client.sendall(payload)
    assert read_sized_body(_environ(server, len(payload)), len(payload), 100_000, 0.5) == payload
    assert server.gettimeout() is None  # no timeout set: nothing to wait for
    with pytest.raises(ApiError) as error:
        read_sized_body(_environ(server, len(payload)), len(payload), 1000, 0.5)
    assert (error.value.status, error.value.code) == (413, "payload_too_large")


def test_a_buffered_body_cut_short_is_a_400(connection: Connection, buffered: None) -> None:
    server, client = connection
    client.sendall(b'{"type": "x"')
    client.shutdown(socket.SHUT_WR)  # the client's half-close: the server read all it sent
    with pytest.raises(ApiError) as error:
        read_sized_body(_environ(server, 100), 100, 1000, 0.5)
    assert (error.value.status, error.value.code) == (400, "invalid_body")


def test_an_unbuffered_sized_body_gets_the_timeouts(connection: Connection) -> None:
    server, client = connection
    client.sendall(b'{"type": ')  # and then nothing
    with pytest.raises(ApiError) as error:
        read_sized_body(_environ(server, 50), 50, 1000, 0.2)
    assert (error.value.status, error.value.code) == (408, "request_timeout")
