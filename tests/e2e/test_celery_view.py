"""Celery's view of the work, as Flower and an operator see it, through a running stack.

`celery -A workers.worker events --dump` (the event feed Flower draws its task pages from) and
`celery inspect` (Flower's worker pages) watch while messages carrying distinctive apiKeys and
identities are delivered, retried and dead-lettered: neither shows any of those values, both
show the tasks (by message id, type, account and event count), and a delivery that failed and
went to the retry schedule is reported as a retry with its reason, never as a success.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from common import dead_letters
from devtools.faults import fresh_message, new_secret, post, sha
from schemas.messages import EVENTS
from tests.support import BATCHING_DB, BIN, Proc, Stub, own_stub, wait_for
from tests.support.stack import KEYS, TOKEN, Stack, delivered_events, started_stack

# An event line of the dump starts with the node name and the time; a traceback continues it.
_EVENT_START = re.compile(r"^\S+@\S+ \[\d{4}-", re.MULTILINE)


@pytest.fixture(scope="module")
def view_stub(logs_dir: Path) -> Iterator[Stub]:
    with own_stub(logs_dir, name="celery-view-stub") as client:
        yield client


@pytest.fixture(scope="module")
def view_stack(view_stub: Stub, logs_dir: Path) -> Iterator[Stack]:
    settings = {"RETRY_MAX_ATTEMPTS": "3", "PARTNER_TIMEOUT_SECONDS": "10", "PARTNER_RATE_LIMIT": "1000/second"}
    with started_stack(BATCHING_DB, view_stub, logs_dir, "celery-view", **settings) as stack:
        yield stack


def _message(api_key: str, secrets: dict[str, str], name: str) -> dict[str, Any]:
    """An event batch whose apiKey and identities are values no log or event can hold by chance."""
    message = fresh_message(EVENTS, api_key)
    email = f"{new_secret(name)}@example.com"
    customer, device = new_secret(f"{name}_customer"), str(uuid.uuid4())
    message["user_identities"] = [
        {"type": "email", "encoding": "raw", "value": email},
        {"type": "customer", "encoding": "raw", "value": customer},
    ]
    message["device_info"] = {"ios_advertising_id": device, "ios_idfv": device}
    secrets.update({f"{name} apiKey": api_key, f"{name} email": email, f"{name} customer": customer})
    secrets[f"{name} device id"] = device
    return message


def _celery(stack: Stack, *args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [str(BIN / "celery"), "-A", "workers.worker", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout + done.stderr


def _events(dump: str, message_id: str) -> list[str]:
    """The dump's events (with any traceback that follows) of the tasks that carried this message."""
    starts = [m.start() for m in _EVENT_START.finditer(dump)] + [len(dump)]
    events = [dump[a:b] for a, b in itertools.pairwise(starts)]
    return [event for event in events if message_id in event]


def _kinds(events: list[str]) -> set[str]:
    return {m.group(1) for event in events if (m := re.search(r"\] (task [a-z]+):", event))}


def test_events_and_inspect_show_summaries_and_the_truth_never_a_secret(
    view_stack: Stack, view_stub: Stub, logs_dir: Path
) -> None:
    secrets: dict[str, str] = {"firehose token": TOKEN}
    ok_key, failing_key, slow_key = new_secret("ak_ok"), new_secret("ak_failing"), new_secret("ak_slow")
    view_stub.faults(
        [
            {"path_prefix": "/v1", "status": 503, "api_key_sha256": sha(failing_key)},
            # Answered 200, but only after long enough to ask the worker what it is running.
            {"path_prefix": "/v1", "status": None, "latency_ms": 8000, "api_key_sha256": sha(slow_key)},
        ]
    )
    dumper = Proc(
        "celery-view-events",
        [str(BIN / "celery"), "-A", "workers.worker", "events", "--dump"],
        view_stack.env,
        logs_dir,
    )
    try:
        # A worker heartbeat in the dump: it is subscribed, so no task event can pass unseen.
        dumper.wait_output("heartbeat", 60)
        ok = _message(ok_key, secrets, "ok")
        failing = _message(failing_key, secrets, "failing")
        slow = _message(slow_key, secrets, "slow")
        for message in (ok, failing, slow):
            assert post(view_stack.url, message, TOKEN).status_code == 202

        def slow_call_in_flight() -> bool:
            return any(
                r["api_key_sha256"] == sha(slow_key) and r["status"] is None for r in view_stub.requests("/v1/events")
            )

        wait_for(slow_call_in_flight, 60, 0.1, "the slow partner call")
        active = _celery(view_stack, "inspect", "active", "--json", "--timeout", "2")
        assert slow["id"] in active, active
        [[running]] = orjson.loads(active).values()
        queried = _celery(view_stack, "inspect", "query_task", running["id"], "--json", "--timeout", "2")
        assert slow["id"] in queried, queried
        reserved = _celery(view_stack, "inspect", "reserved", "--json", "--timeout", "2")

        wait_for(lambda: len(delivered_events(view_stub, ok_key)) == 2, 60, 0.2, "the good batch delivered")
        wait_for(lambda: len(delivered_events(view_stub, slow_key)) == 2, 60, 0.2, "the slow batch delivered")
        wait_for(lambda: dead_letters.get(view_stack.redis, KEYS, failing["id"]), 60, 0.2, "the failing batch's letter")
        # The letter is written before the task ends: wait for the end's event too.
        wait_for(lambda: "task failed" in _kinds(_events(dumper.output(), failing["id"])), 30, 0.2, "task-failed")
    finally:
        dumper.stop()
        view_stub.faults([])
    dump = dumper.output()

    shown = {
        "events --dump": dump,
        "inspect active": active,
        "inspect query_task": queried,
        "inspect reserved": reserved,
    }
    found = {where: sorted(name for name, value in secrets.items() if value in text) for where, text in shown.items()}
    assert not any(found.values()), found

    # Not vacuous: the dump saw every task, by the summary the pump gave it.
    ok_events, failing_events, slow_events = (_events(dump, m["id"]) for m in (ok, failing, slow))
    for events in (ok_events, slow_events):
        assert {"task sent", "task received", "task started", "task succeeded"} <= _kinds(events), events
    assert "'type': 'event_processing_request'" in ok_events[0] and "'events': 2" in ok_events[0]

    # The failing batch: each attempt that went to the retry schedule is a retry with its reason
    # and due time; the last, out of attempts, a failure naming the dead letter's reason.
    kinds = _kinds(failing_events)
    assert "task succeeded" not in kinds, failing_events
    retried = [event for event in failing_events if "] task retried:" in event]
    assert all("Rescheduled(" in event and " due " in event for event in retried), retried
    # RETRY_MAX_ATTEMPTS=3: attempts 1 and 2 failed into the schedule (a gate's deferral, were
    # there one, would be a retry event of its own, "deferred (...)").
    assert sum("retry (partner_transient, last status 503)" in event for event in retried) == 2, retried
    [failed] = [event for event in failing_events if "] task failed:" in event]
    assert "DeadLettered" in failed and "max_attempts" in failed and "last status 503" in failed, failed
