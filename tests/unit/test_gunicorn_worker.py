"""service/gunicorn_worker.py in process: when the poller deems a buffered request whole, and the
board the worker processes share to take turns at accepting. The worker itself runs under the real
gunicorn in tests/e2e/test_slow_clients.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from gunicorn.config import Config

from service.gunicorn_worker import Board, BufferedConn, scan

HEADER_CAP, BODY_CAP = 4096, 1000


@pytest.fixture
def conn() -> Iterator[BufferedConn]:
    a, b = socket.socketpair()
    try:
        yield BufferedConn(Config(), a, ("127.0.0.1", 1), ("127.0.0.1", 2))
    finally:
        a.close()
        b.close()


def feed(conn: BufferedConn, data: bytes) -> list[str]:
    """scan() after each byte, as a client dripping one byte at a time is read."""
    states = []
    for i in range(len(data)):
        conn.buf += data[i : i + 1]
        states.append(scan(conn, HEADER_CAP, BODY_CAP))
    return states


def test_a_content_length_request_is_whole_with_its_last_byte_and_not_before(conn: BufferedConn) -> None:
    request = b"POST /firehose HTTP/1.1\r\nHost: x\r\ncontent-LENGTH: 5\r\n\r\nhello"
    assert feed(conn, request) == ["more"] * (len(request) - 1) + ["ready"]


def test_a_request_without_a_body_is_whole_with_its_headers(conn: BufferedConn) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    assert feed(conn, request)[-1] == "ready"


def test_a_chunked_body_is_whole_after_its_last_chunk_and_trailers(conn: BufferedConn) -> None:
    head = b"POST /firehose HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3;ext=1\r\nabc\r\n10\r\n" + b"y" * 16 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
    states = feed(conn, head + body)
    assert states == ["more"] * (len(head + body) - 1) + ["ready"]


def test_expect_100_continue_is_noted_for_http_1_1_only(conn: BufferedConn) -> None:
    conn.buf += b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    assert scan(conn, HEADER_CAP, BODY_CAP) == "more" and conn.expects_continue
    conn.take()
    conn.buf += b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    assert scan(conn, HEADER_CAP, BODY_CAP) == "more" and not conn.expects_continue


def test_a_body_over_the_cap_is_refused_once_the_headers_say_so(conn: BufferedConn) -> None:
    conn.buf += b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n"
    assert scan(conn, HEADER_CAP, BODY_CAP) == "too_large"
    conn.take()
    conn.buf += b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"100\r\n" + b"z" * 256 + b"\r\n") * 5
    assert scan(conn, HEADER_CAP, BODY_CAP) == "too_large"


@pytest.mark.parametrize(
    "request_",
    [
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",  # conflicting lengths
        b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
        b"POST / HTTP/1.1\r\nX-Long: " + b"a" * HEADER_CAP,  # past gunicorn's header limits
    ],
)
def test_framing_gunicorn_refuses_goes_to_its_parser_at_once(conn: BufferedConn, request_: bytes) -> None:
    """Handed over without waiting for more: gunicorn's parser answers it (400, 431...) at once."""
    conn.buf += request_
    assert scan(conn, HEADER_CAP, BODY_CAP) == "ready"


def test_the_board_counts_only_other_live_workers_with_room() -> None:
    board = Board(slots=4)
    me = board.claim(os.getpid())
    assert me is not None
    # A slot claimed by a process that has gone is free again; a live one is not.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    other = board.claim(dead_pid)
    assert other is not None and other != me
    assert board.fewest_elsewhere(me, cap=10) is None  # claimed, but no heartbeat yet: still loading
    board.publish(other, dead_pid, 3)
    assert board.fewest_elsewhere(me, cap=10) == 3
    assert board.fewest_elsewhere(me, cap=3) is None  # full: no use waiting for it
    # The dead process's slot is the first free one again; this live process's is not.
    assert board.claim(os.getppid()) == other
    assert board.claim(os.getppid() + 10_000_000) not in (None, me, other)
    board.release(me, os.getpid())
    assert board.claim(os.getpid()) == me
