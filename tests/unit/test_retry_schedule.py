"""The retry schedule on the suite's Redis: entries wait by due time, and the pump's `move_due`
moves due ones into the inbox, in due order, each in one step."""

from __future__ import annotations

import time
from collections.abc import Iterator

import orjson
import pytest
import redis

from common.keys import Keys
from tests.support.worker_core import client, core_settings
from workers.grouping import GROUP, plan_jobs
from workers.scheduler import RetrySchedule


@pytest.fixture
def setup() -> Iterator[tuple[redis.Redis, Keys, RetrySchedule]]:
    settings = core_settings()
    c = client(settings)
    keys = Keys(settings.key_prefix)
    yield c, keys, RetrySchedule(c, keys)
    c.close()


def _schedule(retries: RetrySchedule, body: str, delay: float, attempt: int = 2, kind: str = "t") -> None:
    retries.schedule(body, message_id=f"id-{body}", message_type=kind, attempt=attempt, first_seen_ms=42, delay=delay)


def test_only_due_entries_move_in_due_order(setup: tuple[redis.Redis, Keys, RetrySchedule]) -> None:
    c, keys, retries = setup
    _schedule(retries, "later", 0.01)
    _schedule(retries, "now", 0)
    _schedule(retries, "much-later", 60)
    time.sleep(0.015)
    assert retries.move_due(10) == 2
    inbox = c.xrange(keys.inbox)
    assert [fields[b"body"] for _, fields in inbox] == [b"now", b"later"]
    assert inbox[0][1] == {b"body": b"now", b"type": b"t", b"id": b"id-now", b"attempt": b"2", b"first_seen": b"42"}
    [left] = c.zrange(keys.retry_schedule, 0, -1)
    assert orjson.loads(left)["body"] == "much-later"
    assert retries.move_due(10) == 0 and c.xlen(keys.inbox) == 2


def test_move_due_takes_at_most_its_limit(setup: tuple[redis.Redis, Keys, RetrySchedule]) -> None:
    c, keys, retries = setup
    for n in range(5):
        _schedule(retries, f"m{n}", 0)
    assert retries.move_due(2) == 2
    # Each entry is in exactly one place: moved entries left the schedule as they entered the inbox.
    assert (c.xlen(keys.inbox), c.zcard(keys.retry_schedule)) == (2, 3)
    assert retries.move_due(10) == 3
    assert (c.xlen(keys.inbox), c.zcard(keys.retry_schedule)) == (5, 0)


def test_moved_entries_keep_attempt_first_seen_and_group(setup: tuple[redis.Redis, Keys, RetrySchedule]) -> None:
    c, keys, retries = setup
    members = orjson.dumps(["a", "b"]).decode()
    _schedule(retries, members, 0, attempt=3, kind=GROUP)
    retries.move_due(10)
    [job] = plan_jobs(c.xrange(keys.inbox), max_messages=50, max_events=1000)
    assert (job.task, job.bodies, job.attempt, job.first_seen_ms) == ("events", ["a", "b"], 3, 42)
