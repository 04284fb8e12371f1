"""The Celery task bodies called as plain functions, inside a Flask app context holding an
in-process Runtime: no broker, no worker, no eager mode."""

from __future__ import annotations

import os
from collections.abc import Iterator

import orjson
import pytest
from celery.exceptions import Reject
from flask import Flask
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import dead_letters, redis_conn, stats
from common.keys import partner_key
from common.names import DELIVER_EVENTS_TASK, DELIVER_TASK
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import body, core_runtime, message
from workers import runtime as runtime_module
from workers import tasks
from workers.grouping import GROUP
from workers.runtime import Runtime


def _app_with(rt: Runtime) -> Flask:
    app = Flask("tasks-under-test")
    app.config["SETTINGS"] = rt.settings
    # The runtime `runtime()` would build for this app in this process, given beforehand.
    app.extensions[runtime_module._EXTENSION] = (os.getpid(), rt)
    return app


@pytest.fixture
def partner() -> ScriptedPartnerClient:
    return ScriptedPartnerClient()


@pytest.fixture
def rt(partner: ScriptedPartnerClient) -> Iterator[Runtime]:
    runtime = core_runtime(partner)
    with _app_with(runtime).app_context():
        yield runtime
    runtime.redis.close()


def test_task_names_are_unchanged() -> None:
    assert (tasks.deliver.name, tasks.deliver_events.name) == (DELIVER_TASK, DELIVER_EVENTS_TASK)
    assert (DELIVER_TASK, DELIVER_EVENTS_TASK) == ("firehose.deliver", "firehose.deliver_events")


def test_deliver_task_delivers_one_message(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message()
    tasks.deliver.run(body(msg), attempt=1, first_seen_ms=None)
    assert len(partner.calls) == 1 and rt.redis.hget(rt.keys.stats, stats.DELIVERED) == b"1"


def test_deliver_events_task_retries_its_group(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    partner.answers = [503]
    bodies = [body(message(api_key="g")) for _ in range(2)]
    tasks.deliver_events.run(bodies, attempt=1)
    [entry] = [orjson.loads(m) for m in rt.redis.zrange(rt.keys.retry_schedule, 0, -1)]
    assert (entry["type"], entry["attempt"], orjson.loads(entry["body"])) == (GROUP, 2, bodies)


def test_a_fault_of_ours_dead_letters_every_message_as_internal_error(
    rt: Runtime, partner: ScriptedPartnerClient
) -> None:
    partner.answers = [RuntimeError("bug")]
    msgs = [message(api_key="g"), message(api_key="g")]
    tasks.deliver_events.run([body(m) for m in msgs], attempt=3)
    letters = dead_letters.list_letters(rt.redis, rt.keys)
    assert sorted(letter.id for letter in letters) == sorted(m["id"] for m in msgs)
    assert {(letter.reason, letter.error, letter.attempts) for letter in letters} == {
        ("internal_error", "RuntimeError", 3)
    }
    assert {letter.type for letter in letters} == {"event_processing_request"}


def test_a_redis_error_puts_the_message_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Redis that is not there: a real connection error, no mock.
    # Workers retry Redis for seconds (a failover); one attempt is enough to see the error here.
    monkeypatch.setattr(redis_conn, "_worker_retry", lambda: Retry(NoBackoff(), 0))
    rt = core_runtime(redis_url="redis://127.0.0.1:1/0")
    monkeypatch.setattr(tasks, "REDIS_ERROR_PAUSE_SECONDS", 0.0)
    with _app_with(rt).app_context(), pytest.raises(Reject) as info:
        tasks.deliver.run(body(message()))
    assert info.value.requeue is True


def test_a_task_gives_its_lane_slot_back_when_it_ends(
    rt: Runtime, partner: ScriptedPartnerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pump took a slot in the message's lane when it published the task; the task's end,
    delivered or failed, gives it back so the lane's next work can go."""
    msg = message(api_key="slot-key")
    slots = rt.keys.lane_slots(partner_key("slot-key"))
    monkeypatch.setattr(tasks, "_current_task_id", lambda: "task-1")
    for answers in ([200], [503]):
        partner.answers = answers
        rt.redis.zadd(slots, {"task-1": 2**40, "task-2": 2**40})
        tasks.deliver.run(body(msg))
        assert rt.redis.zrange(slots, 0, -1) == [b"task-2"]
        msg = message(api_key="slot-key")
