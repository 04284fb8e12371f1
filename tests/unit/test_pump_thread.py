"""The inbox pump as the worker runs it: the light-traffic wait, the thread's loop through a
broker outage, and the worker step that starts and stops it. On the suite's Redis, publishing
to a recording Celery stand-in (no broker). (Sorting, lanes and claiming: test_inbox_pump.py.)"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import redis

from common.config import Settings
from common.keys import Keys
from common.names import DELIVER_EVENTS_TASK, INBOX_GROUP
from tests.support.worker_core import SUBSCRIPTION_MESSAGE, body, client, core_settings, message
from workers import pump as pump_module
from workers.pump import InboxPump, PumpStep


class RecordingApp:
    """What the pump uses of a Celery app, recorded; `fail` makes every publish raise."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[dict[str, Any]] = []

    @contextmanager
    def producer_or_acquire(self, producer: Any = None) -> Iterator[str]:
        yield "producer"

    def send_task(self, name: str, **options: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append({"name": name, **options})


@pytest.fixture
def settings() -> Settings:
    return core_settings(pump_batch_size=50, pump_claim_idle_ms=60_000, delivery_batch_max_messages=10)


@pytest.fixture
def redis_conn(settings: Settings) -> Iterator[redis.Redis]:
    c = client(settings)
    yield c
    c.close()


def _with(settings: Settings, **changes: Any) -> Settings:
    return Settings(**(settings.model_dump() | changes))


def _pump(app: RecordingApp, settings: Settings, consumer: str) -> InboxPump:
    pump = InboxPump(app, settings, consumer=consumer)  # type: ignore[arg-type]
    pump.queue = f"{settings.key_prefix}:celery"  # Celery's list of this test's own
    pump.ensure_group()
    return pump


def _add(c: redis.Redis, settings: Settings, msg: dict[str, Any]) -> None:
    c.xadd(Keys(settings.key_prefix).inbox, {"body": body(msg), "type": msg["type"], "id": msg["id"]})


def _wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"the pump waited {seconds} s")


def test_a_light_batch_waits_once_to_fill_the_partner_call(
    settings: Settings, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _with(settings, delivery_batch_wait_ms=40)
    app = RecordingApp()
    pump = _pump(app, settings, "w1")
    pump.run_once()  # past its own (empty) pending list, as a running pump is
    first, late = message(api_key="a"), message(api_key="a")
    _add(redis_conn, settings, first)
    waits: list[float] = []
    real_sleep = time.sleep

    def arrives_during_the_wait(seconds: float) -> None:
        # Deterministic: the second message lands exactly while the pump waits for more.
        waits.append(seconds)
        _add(redis_conn, settings, late)
        real_sleep(seconds)

    monkeypatch.setattr(pump_module.time, "sleep", arrives_during_the_wait)
    assert pump.run_once() == 2
    monkeypatch.undo()
    assert waits == [0.04]
    [task] = app.sent
    assert task["name"] == DELIVER_EVENTS_TASK
    assert [orjson.loads(b)["id"] for b in task["args"][0]] == [first["id"], late["id"]]


def test_a_restarted_pump_sends_its_own_pending_entries_without_waiting(
    settings: Settings, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    _add(redis_conn, settings, message(SUBSCRIPTION_MESSAGE))
    with pytest.raises(ConnectionError):
        _pump(RecordingApp(fail=True), settings, "w1").run_once()
    # Work that waited through a crash already waited long enough.
    monkeypatch.setattr(pump_module.time, "sleep", _no_sleep)
    app = RecordingApp()
    assert _pump(app, _with(settings, delivery_batch_wait_ms=10_000), "w1").run_once() == 1
    assert len(app.sent) == 1


def test_a_redis_error_other_than_an_existing_group_is_raised(settings: Settings, redis_conn: redis.Redis) -> None:
    redis_conn.set(Keys(settings.key_prefix).inbox, "not a stream")
    pump = InboxPump(RecordingApp(), settings, consumer="w1")  # type: ignore[arg-type]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        pump.ensure_group()


def test_the_pump_outlives_a_broker_outage_and_resends_what_it_had_read(
    settings: Settings, redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = RecordingApp(fail=True)
    pump = _pump(app, settings, "w1")
    msg = message(SUBSCRIPTION_MESSAGE)
    _add(redis_conn, settings, msg)
    stop = threading.Event()
    thread = threading.Thread(target=pump.run, args=(stop,), daemon=True)

    def errors() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", None) == "pump_error"]

    with caplog.at_level(logging.WARNING, logger="workers.pump"):
        thread.start()
        try:
            assert _wait_until(lambda: bool(errors()))
            app.fail = False  # the broker is back: the entry is read again from the pending list
            assert _wait_until(lambda: bool(app.sent))
        finally:
            stop.set()
            thread.join(timeout=5)
    assert not thread.is_alive()
    assert errors()[0].error == "ConnectionError"  # type: ignore[attr-defined]
    assert [t["task_id"] for t in app.sent] == [msg["id"]]


def test_the_worker_step_runs_the_pump_in_a_thread_and_stops_it(settings: Settings, redis_conn: redis.Redis) -> None:
    app = RecordingApp()
    app.flask_app = SimpleNamespace(config={"SETTINGS": settings})  # type: ignore[attr-defined]
    worker = SimpleNamespace(app=app, hostname="w1@host")
    step = PumpStep(worker)
    step.start(worker)
    try:
        msg = message(SUBSCRIPTION_MESSAGE)
        _add(redis_conn, settings, msg)
        assert _wait_until(lambda: bool(app.sent))
    finally:
        step.stop(worker)
    assert step.thread is not None and not step.thread.is_alive()
    assert [t["task_id"] for t in app.sent] == [msg["id"]]
    # The pump reads under a name derived from the worker's, so its entries can be told apart.
    consumers = redis_conn.xinfo_consumers(Keys(settings.key_prefix).inbox, INBOX_GROUP)
    assert consumers and all(c["name"].startswith(b"w1@host") for c in consumers)
