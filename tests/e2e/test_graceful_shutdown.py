"""SIGTERM with work in flight: nothing accepted is lost, nothing delivered is sent twice.

Real processes only: gunicorn, Celery workers, Redis and the partner stub. Two ways a platform
stops a process are covered: a signal to the main process alone (docker stop, ECS) and to
every process of the container (Heroku signals the whole dyno).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_lib

from common.config import Settings
from common.keys import Keys
from common.names import DELIVERY_QUEUE
from devtools.procs import start_web, start_worker
from service import create_app
from tests.support import SUITE_TOKEN, Proc, Stub, base_env, sample, wait_for

KEYS = Keys("fr")
LATENCY_MS = 2000


def drained(client: redis_lib.Redis) -> bool:
    """Nothing in the inbox, in Celery's queue, or held unacknowledged by a worker."""
    return client.xlen(KEYS.inbox) == 0 and client.llen(DELIVERY_QUEUE) == 0 and client.hlen("unacked") == 0


def fresh_batch() -> dict[str, Any]:
    """The iOS sample with a new message id and new event ids, so counts at the stub are its own."""
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = str(uuid.uuid4())
    for event in message["events"]:
        event["id"] = str(uuid.uuid4())
    return message


def ours(stub: Stub, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stub's /v1/events calls that carry these messages (not leftovers of other tests)."""
    ids = {m["id"] for m in messages}
    return [
        call
        for call in stub.requests("/v1/events")
        if any(b.get("message_id") in ids for b in (call.get("body") or {}).get("batches", []))
    ]


def stop_signal(proc: Proc, how: str) -> None:
    if how == "main process":
        os.kill(proc.popen.pid, signal.SIGTERM)
    else:
        proc.signal(signal.SIGTERM)  # the whole process group


@pytest.fixture
def quiet_stub(stub: Stub) -> Iterator[Stub]:
    stub.reset()
    yield stub
    # Later tests share the stub: leave it without faults.
    stub.reset()


@pytest.mark.parametrize("how", ["main process", "process group"])
def test_worker_sigterm_mid_delivery_loses_and_repeats_nothing(
    how: str, redis_url: str, redis_client: redis_lib.Redis, quiet_stub: Stub, logs_dir: Path
) -> None:
    env = base_env(redis_url, PARTNER_API_URL=quiet_stub.url)
    tag = "main" if how == "main process" else "group"
    first = start_worker(f"graceful-worker-{tag}-1", env, logs_dir, concurrency=2)
    second: Proc | None = None
    try:
        # Whatever earlier tests left queued is delivered first, so what follows counts only ours.
        wait_for(lambda: drained(redis_client), 60, 0.2, "earlier work to drain")
        quiet_stub.reset()
        quiet_stub.faults([{"path_prefix": "/v1/events", "status": None, "latency_ms": LATENCY_MS}])

        # An in-process door only to queue the messages: open on purpose.
        settings = Settings(redis_url=redis_url, ingest_redis_timeout_ms=1000, auth_disabled=True)
        client = create_app(settings).test_client()
        messages = [fresh_batch() for _ in range(4)]
        for message in messages:
            assert client.post("/firehose", data=orjson.dumps(message)).status_code == 202

        # The stub records a call when it arrives and its status once answered: a None status is
        # a call in flight, held by the latency rule.
        wait_for(
            lambda: any(r["status"] is None for r in ours(quiet_stub, messages)),
            30,
            0.05,
            "a partner call in flight",
        )
        stop_signal(first, how)
        try:
            code = first.popen.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop within 30 s of SIGTERM:\n{first.output()[-3000:]}")
        assert code == 0, first.output()[-3000:]
        # Warm shutdown: the calls in flight were answered, not cut off. The worker runs the
        # thread pool (WORKER_POOL's default), one process: the whole group signalled (Heroku) is
        # the same SIGTERM to that process. (Under WORKER_POOL=prefork the pool processes would
        # die at once and their tasks come back, reject_on_worker_lost, to be sent again with the
        # same Idempotency-Key.)
        assert all(r["status"] == 202 for r in ours(quiet_stub, messages)), first.output()[-3000:]

        second = start_worker(f"graceful-worker-{tag}-2", env, logs_dir, concurrency=2)
        wanted = {event["id"] for message in messages for event in message["events"]}
        wait_for(
            lambda: wanted <= set(quiet_stub.state()["events"]),
            60,
            0.2,
            "every event at the stub after the restart",
        )
        wait_for(lambda: drained(redis_client), 60, 0.2, "the queues to drain")
        counts = quiet_stub.state()["events"]
        assert {i: counts[i] for i in wanted} == dict.fromkeys(wanted, 1)
        # Nothing was sent twice: each delivered call finished and was marked before the exit.
        calls = ours(quiet_stub, messages)
        sent = sorted(b["message_id"] for c in calls for b in c["body"]["batches"])
        assert sent == sorted(m["id"] for m in messages), calls
        assert not [c for c in calls if c["duplicate"]], calls
    finally:
        first.stop()
        if second is not None:
            second.stop()


def open_slow_request(port: int, body: bytes) -> socket.socket:
    """A POST whose headers are sent and whose body is not: a request held in flight.

    `Expect: 100-continue` makes gunicorn say when a worker has taken the request, so the
    test knows the request is inside the app before it sends the signal.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        "POST /firehose HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Token {SUITE_TOKEN}\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) // 2])
    assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue"), "gunicorn did not take the request"
    return sock


def finish_request(sock: socket.socket, body: bytes) -> tuple[int, bytes]:
    sock.sendall(body[len(body) // 2 :])
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


@pytest.mark.parametrize("how", ["main process", "process group"])
def test_web_sigterm_finishes_requests_in_flight(
    how: str, redis_url: str, redis_client: redis_lib.Redis, logs_dir: Path
) -> None:
    tag = "main" if how == "main process" else "group"
    proc, url = start_web(base_env(redis_url), logs_dir, name=f"graceful-web-{tag}")
    port = int(url.rsplit(":", 1)[1])
    sockets: list[socket.socket] = []
    try:
        # start_web runs two sync workers: one request in flight in each.
        messages = [fresh_batch() for _ in range(2)]
        bodies = [orjson.dumps(m) for m in messages]
        sockets = [open_slow_request(port, body) for body in bodies]

        stop_signal(proc, how)
        proc.wait_output("Handling signal: term", timeout=10)
        # The master signals its workers right after that line; give it a moment so the
        # workers hold the signal while their requests are still waiting for the body.
        time.sleep(0.5)

        answers = [finish_request(sock, body) for sock, body in zip(sockets, bodies, strict=True)]
        for status, payload in answers:
            assert status == 202, payload
            assert orjson.loads(payload)["type"] == "event_processing_response"
        try:
            code = proc.popen.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gunicorn did not stop within 30 s of SIGTERM:\n{proc.output()[-3000:]}")
        assert code == 0, proc.output()[-3000:]
        # Answered 2xx, so stored: in the inbox, byte for byte.
        stored = {f[b"id"].decode(): f[b"body"] for _, f in redis_client.xrange(KEYS.inbox)}
        for message, body in zip(messages, bodies, strict=True):
            assert stored.get(message["id"]) == body
    finally:
        for sock in sockets:
            sock.close()
        proc.stop()
