"""The answers gunicorn writes itself (service/gunicorn_errors.py), written to a real socket pair."""

from __future__ import annotations

import inspect
import socket
from collections.abc import Iterator

import orjson
import pytest
from gunicorn import util

from schemas.errors import error_body
from service import gunicorn_errors


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def _written(pair: tuple[socket.socket, socket.socket], status: int, reason: str, mesg: str) -> tuple[str, bytes]:
    ours, peer = pair
    gunicorn_errors.write_json_error(ours, status, reason, mesg)
    ours.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := peer.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def test_a_gunicorn_error_is_the_services_json_shape_without_gunicorns_text(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # gunicorn's message may quote the offending header, token and all.
    head, body = _written(pair, 431, "Request Header Fields Too Large", "Authorization: Token sekrit-123")
    lines = head.split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert {"Connection: close", "Content-Type: application/json", f"Content-Length: {len(body)}"} <= set(lines[1:])
    assert orjson.loads(body) == error_body("request_header_fields_too_large", "Request headers too large.")
    assert b"sekrit" not in head.encode() + body


def test_a_status_without_its_own_code_is_a_bad_request(pair: tuple[socket.socket, socket.socket]) -> None:
    head, body = _written(pair, 417, "Expectation Failed", "anything")
    assert head.startswith("HTTP/1.1 417 Expectation Failed\r\n")
    assert orjson.loads(body) == error_body("bad_request", "Malformed HTTP request.")


def test_install_swaps_gunicorns_writer_for_one_it_can_call(monkeypatch: pytest.MonkeyPatch) -> None:
    original = util.write_error
    monkeypatch.setattr(util, "write_error", original)  # put back after the test
    gunicorn_errors.install()
    assert util.write_error is gunicorn_errors.write_json_error
    # gunicorn calls it positionally, as it calls its own: the parameters must line up.
    assert list(inspect.signature(original).parameters) == list(
        inspect.signature(gunicorn_errors.write_json_error).parameters
    )
