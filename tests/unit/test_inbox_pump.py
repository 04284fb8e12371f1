"""The inbox pump on the suite's Redis, publishing to a recording Celery stand-in (no broker):
entries leave the stream only after their tasks are published, and none is lost to a crash."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
import redis

from common.config import Settings
from common.names import DELIVER_EVENTS_TASK, DELIVER_TASK, DELIVERY_QUEUE, INBOX_GROUP
from tests.support.worker_core import SUBSCRIPTION_MESSAGE, body, client, core_settings, message
from workers.grouping import GROUP
from workers.pump import InboxPump


class RecordingApp:
    """What the pump uses of a Celery app: `producer_or_acquire` and `send_task`, recorded.

    `inbox_at_publish` is the stream's length at each publish: the entries must still be there.
    """

    def __init__(self, redis_conn: redis.Redis, inbox: str, fail: bool = False) -> None:
        self.redis = redis_conn
        self.inbox = inbox
        self.fail = fail
        self.producers = 0
        self.sent: list[dict[str, Any]] = []
        self.inbox_at_publish: list[int] = []

    @contextmanager
    def producer_or_acquire(self, producer: Any = None) -> Iterator[str]:
        self.producers += 1
        yield f"producer-{self.producers}"

    def send_task(self, name: str, **options: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.inbox_at_publish.append(self.redis.xlen(self.inbox))
        self.sent.append({"name": name, **options})


@pytest.fixture
def settings() -> Settings:
    return core_settings(pump_batch_size=50, pump_claim_idle_ms=10, delivery_batch_max_messages=10)


@pytest.fixture
def redis_conn(settings: Settings) -> Iterator[redis.Redis]:
    c = client(settings)
    yield c
    c.close()


def _pump(app: RecordingApp, settings: Settings, consumer: str) -> InboxPump:
    pump = InboxPump(app, settings, consumer=consumer)  # type: ignore[arg-type]
    pump.ensure_group()
    return pump


def _add(c: redis.Redis, settings: Settings, msg: dict[str, Any]) -> None:
    c.xadd(f"{settings.key_prefix}:inbox", {"body": body(msg), "type": msg["type"], "id": msg["id"]})


def _pending(c: redis.Redis, settings: Settings) -> int:
    return int(c.xpending(f"{settings.key_prefix}:inbox", INBOX_GROUP)["pending"])


def test_entries_become_tasks_and_leave_the_stream_after_publishing(
    settings: Settings, redis_conn: redis.Redis
) -> None:
    inbox = f"{settings.key_prefix}:inbox"
    app = RecordingApp(redis_conn, inbox)
    pump = _pump(app, settings, "w1")
    events = [message(api_key="a"), message(api_key="a"), message(api_key="b")]
    sub = message(SUBSCRIPTION_MESSAGE, api_key="a")
    for msg in [*events, sub]:
        _add(redis_conn, settings, msg)
    assert pump.run_once() == 4
    assert app.producers == 1 and app.inbox_at_publish == [4, 4, 4]
    assert {(t["name"], t["queue"]) for t in app.sent} == {
        (DELIVER_EVENTS_TASK, DELIVERY_QUEUE),
        (DELIVER_TASK, DELIVERY_QUEUE),
    }
    assert all(t["producer"] == "producer-1" for t in app.sent)
    groups = sorted(
        ([orjson.loads(b)["id"] for b in t["args"][0]] for t in app.sent if t["name"] == DELIVER_EVENTS_TASK), key=len
    )
    assert groups == [[events[2]["id"]], [events[0]["id"], events[1]["id"]]]
    [single] = [t for t in app.sent if t["name"] == DELIVER_TASK]
    assert single["args"] == [body(sub)] and single["task_id"] == sub["id"]
    assert single["kwargs"]["attempt"] == 1 and single["kwargs"]["first_seen_ms"] > 0
    assert redis_conn.xlen(inbox) == 0 and _pending(redis_conn, settings) == 0
    assert pump.run_once() == 0


def test_a_failed_publish_leaves_the_entries_and_a_restart_reads_its_own(
    settings: Settings, redis_conn: redis.Redis
) -> None:
    inbox = f"{settings.key_prefix}:inbox"
    failing = RecordingApp(redis_conn, inbox, fail=True)
    msg = message(SUBSCRIPTION_MESSAGE)
    _add(redis_conn, settings, msg)
    with pytest.raises(ConnectionError):
        _pump(failing, settings, "w1").run_once()
    assert redis_conn.xlen(inbox) == 1 and _pending(redis_conn, settings) == 1
    # The worker restarts under the same name: it reads what it had read but not finished.
    app = RecordingApp(redis_conn, inbox)
    restarted = _pump(app, _with(settings, pump_claim_idle_ms=60_000), "w1")
    assert restarted.run_once() == 1
    assert [t["task_id"] for t in app.sent] == [msg["id"]]
    assert redis_conn.xlen(inbox) == 0 and _pending(redis_conn, settings) == 0


def test_a_dead_consumers_entries_are_claimed(settings: Settings, redis_conn: redis.Redis) -> None:
    inbox = f"{settings.key_prefix}:inbox"
    msg = message(SUBSCRIPTION_MESSAGE)
    _add(redis_conn, settings, msg)
    with pytest.raises(ConnectionError):
        _pump(RecordingApp(redis_conn, inbox, fail=True), settings, "dead").run_once()
    time.sleep(0.015)  # longer than PUMP_CLAIM_IDLE_MS
    app = RecordingApp(redis_conn, inbox)
    assert _pump(app, settings, "alive").run_once() == 1
    assert [t["task_id"] for t in app.sent] == [msg["id"]]
    assert redis_conn.xlen(inbox) == 0 and _pending(redis_conn, settings) == 0


def test_due_retries_are_published_with_their_attempt(settings: Settings, redis_conn: redis.Redis) -> None:
    inbox = f"{settings.key_prefix}:inbox"
    app = RecordingApp(redis_conn, inbox)
    pump = _pump(app, settings, "w1")
    members = [body(message(api_key="a")), body(message(api_key="a"))]
    group = orjson.dumps(members).decode()
    pump.retries.schedule(group, message_id="g", message_type=GROUP, attempt=3, first_seen_ms=42, delay=0)
    pump.retries.schedule("later", message_id="l", message_type="x", attempt=2, first_seen_ms=42, delay=60)
    assert pump.run_once() == 1
    [task] = app.sent
    assert (task["name"], task["args"], task["kwargs"]) == (
        DELIVER_EVENTS_TASK,
        [members],
        {"attempt": 3, "first_seen_ms": 42},
    )
    assert redis_conn.zcard(f"{settings.key_prefix}:retry") == 1


def _with(settings: Settings, **changes: Any) -> Settings:
    return Settings(**(settings.model_dump() | changes))
