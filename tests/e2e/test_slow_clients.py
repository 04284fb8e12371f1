"""The web's worker model against the real gunicorn and the project's gunicorn.conf.py
(service/gunicorn_worker.py): clients that drip bytes hold no thread, a request has a whole-request
deadline, and connections opened together spread over the worker processes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests

from devtools.procs import start_web, wait_for
from tests.support import Proc, base_env, sample

TOKEN = "slow-clients-token"
DRIPPERS = 64  # of each kind: the web must keep serving while this many drip headers and as many drip bodies


def _message() -> bytes:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = str(uuid.uuid4())
    return orjson.dumps(message)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class Drippers:
    """Connections that each send one more byte whenever `drip()` is called: half of them still in
    their headers, half in a body (unauthenticated, under the unauthenticated cap)."""

    def __init__(self, port: int, each: int) -> None:
        head = b"POST /firehose HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        body_head = head + b"Content-Length: 4000\r\n\r\n{"
        self.pending: list[tuple[socket.socket, bytes]] = []
        for _ in range(each):
            self.pending.append((socket.create_connection(("127.0.0.1", port), timeout=5), head + b"X-Pad: " * 500))
        for _ in range(each):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(body_head)  # headers whole, then the body a byte at a time
            self.pending.append((sock, b"x" * 4000))
        self.sent = 0

    def drip(self) -> None:
        for sock, data in self.pending:
            with contextlib.suppress(OSError):  # one the server already cut off
                sock.send(data[self.sent : self.sent + 1])
        self.sent += 1

    def close(self) -> None:
        for sock, _ in self.pending:
            sock.close()


@pytest.fixture
def web(redis_url: str, logs_dir: Path) -> Iterator[tuple[Proc, str]]:
    proc, url = start_web(base_env(redis_url, FIREHOSE_AUTH_TOKEN=TOKEN), logs_dir, name="slow-clients-web")
    try:
        yield proc, url
    finally:
        proc.stop()


def test_health_and_a_firehose_post_answered_within_a_second_while_128_clients_drip(
    web: tuple[Proc, str],
) -> None:
    web = web[1]
    drippers = Drippers(_port(web), DRIPPERS)
    try:
        # Two drips a second apart: every dripping connection has started its request, which
        # under stock gthread puts each in a thread blocked on its next byte.
        for _ in range(2):
            drippers.drip()
            time.sleep(1)
        for _ in range(3):
            drippers.drip()
            started = time.monotonic()
            health = requests.get(f"{web}/healthz", timeout=1)
            health_took = time.monotonic() - started
            started = time.monotonic()
            answer = requests.post(
                f"{web}/firehose", data=_message(), headers={"Authorization": f"Token {TOKEN}"}, timeout=1
            )
            post_took = time.monotonic() - started
            assert health.status_code == 200 and health_took < 1.0, health_took
            assert answer.status_code == 202 and post_took < 1.0, (answer.status_code, post_took)
            time.sleep(1)
    finally:
        drippers.close()


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_request_not_whole_by_the_deadline_gets_408_and_is_closed(where: str, redis_url: str, logs_dir: Path) -> None:
    deadline = 2.0
    env = base_env(redis_url, FIREHOSE_AUTH_TOKEN=TOKEN, REQUEST_DEADLINE_SECONDS=str(deadline))
    proc, url = start_web(env, logs_dir, name=f"deadline-web-{where}")
    try:
        head = f"POST /firehose HTTP/1.1\r\nHost: x\r\nAuthorization: Token {TOKEN}\r\n".encode()
        sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=deadline + 10)
        started = time.monotonic()
        sock.sendall(head if where == "headers" else head + b"Content-Length: 100\r\n\r\n{")
        # A byte every 0.25 s: each read is well within BODY_READ_TIMEOUT_SECONDS, only the
        # whole request's deadline can stop it.
        answer = b""
        sock.settimeout(0.25)
        while time.monotonic() - started < deadline + 10:
            try:
                sock.send(b"x" if where == "body" else b"X")
                answer = sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        took = time.monotonic() - started
        sock.settimeout(5)
        answer += _read_all(sock)  # and then the connection is closed
        sock.close()
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", answer
        assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        assert took >= deadline, took  # not cut off before its deadline
        # And the web goes on serving.
        ok = requests.post(f"{url}/firehose", data=_message(), headers={"Authorization": f"Token {TOKEN}"}, timeout=5)
        assert ok.status_code == 202
    finally:
        proc.stop()


# ------------------------------------------------------------------------------- balance


def _established_to(port: int) -> dict[int, int]:
    """Socket inode → 1 for every established TCP connection whose local port is `port`."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                found[int(fields[9])] = 1
    return found


def _held_by_worker(master_pid: int, port: int) -> dict[int, int]:
    """How many established connections to `port` each gunicorn worker process holds."""
    inodes = _established_to(port)
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    held = {}
    for pid in map(int, children):
        count = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                count += 1
        held[pid] = count
    return held


def _keep_alive_request(sock: socket.socket) -> None:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        data += sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 200"), data


def test_sixteen_keep_alive_connections_opened_together_spread_over_both_workers(web: tuple[Proc, str]) -> None:
    proc, url = web
    port = _port(url)
    master = proc.popen.pid  # gunicorn itself, the workers' parent
    # Both workers up and taking turns: connections opened one by one reach each of them.
    probes: list[socket.socket] = []

    def both_serve() -> bool:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        _keep_alive_request(sock)
        probes.append(sock)
        held = _held_by_worker(master, port)
        return len(held) == 2 and min(held.values()) >= 1

    wait_for(both_serve, 30, 0.1, "both gunicorn workers to take connections")
    for sock in probes:
        sock.close()
    wait_for(lambda: sum(_held_by_worker(master, port).values()) == 0, 10, 0.05, "the probes to be closed")

    # wrk's way: 16 connections opened together, then each used and kept alive; three times.
    for _ in range(3):
        burst = [socket.socket() for _ in range(16)]
        try:
            for sock in burst:
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
            for sock in burst:
                sock.setblocking(True)
                sock.settimeout(5)
                _keep_alive_request(sock)
            held = _held_by_worker(master, port)
            assert sum(held.values()) == 16, held
            # Evenly spread but for a connection or two accepted in the same instant by both.
            assert max(held.values()) <= 10, held
        finally:
            for sock in burst:
                sock.close()
        wait_for(lambda: sum(_held_by_worker(master, port).values()) == 0, 10, 0.05, "the burst to be closed")
