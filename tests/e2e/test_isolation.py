"""One customer never slows another: key A's partner endpoint fails or hangs while key B's
messages keep arriving, and two copies of one worker deploy never call the partner twice.

Real processes: gunicorn, two Celery workers (as devtools.procs starts them, or the Procfile's own
line), the partner stub with fault rules scoped to A's API key. Every assertion is on what
happened (who was delivered, how often, how many calls overlapped at the partner), with generous
bounded deadlines, never on a tight time budget; the lags are only printed, for the reader.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.names import DELIVERY_QUEUE
from devtools.procs import start_procfile_worker
from tests.support import ISOLATION_DB, Proc, Stub, own_stub, wait_for
from tests.support.stack import KEYS, Stack, all_event_ids, make_stack, sha

# The per-key in-flight cap the gate enforces across workers (PARTNER_MAX_IN_FLIGHT_PER_KEY). Set
# explicitly, so the test knows the cap whatever the default; a worker without the setting
# ignores the variable (Settings reads only the names it declares).
IN_FLIGHT_CAP = 3
# Enough attempts to outlast the outage below: what is judged is isolation, not the attempt budget.
SETTINGS = {
    "PARTNER_MAX_IN_FLIGHT_PER_KEY": str(IN_FLIGHT_CAP),
    "RETRY_MAX_ATTEMPTS": "100",
    "RETRY_BACKOFF_MAX": "2",
    # One partner call per message: the most calls A can throw at its failing endpoint.
    "DELIVERY_BATCH_MAX_MESSAGES": "1",
    "PARTNER_RATE_LIMIT": "1000/second",
}
A_MESSAGES = 60
B_MESSAGES = 20
# Generous: B's messages arrive within a second when isolation holds, and within minutes when not.
B_DEADLINE = 90.0
RECOVERY_DEADLINE = 120.0


@pytest.fixture(scope="module")
def isolation_stub(logs_dir: Path) -> Iterator[Stub]:
    with own_stub(logs_dir, name="isolation-stub") as client:
        yield client


@pytest.fixture
def stack_of(isolation_stub: Stub, logs_dir: Path) -> Iterator[Any]:
    """make_stack on the isolation database; every stack started is stopped at the end."""
    stacks: list[Stack] = []

    def make(name: str, workers: int = 2, **env: str) -> Stack:
        isolation_stub.reset()
        stack = make_stack(ISOLATION_DB, isolation_stub, logs_dir, name, workers=workers, **(SETTINGS | env))
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.stop()
        isolation_stub.reset()


def arrivals(stub: Stub) -> dict[str, float]:
    """Event id -> when the first partner call that applied it arrived at the stub."""
    first: dict[str, float] = {}
    for call in stub.requests("/v1/events"):
        if call["fault"] or call["duplicate"] or call["status"] is None or not 200 <= call["status"] < 300:
            continue
        for batch in (call.get("body") or {}).get("batches", []):
            for event in batch.get("events", []):
                if event.get("id") is not None and event["id"] not in first:
                    first[event["id"]] = call["received_at"]
    return first


def post_spaced(stack: Stack, api_key: str, count: int, gap: float) -> list[tuple[float, dict]]:
    """`count` messages for `api_key`, `gap` seconds apart; (wall-clock post time, message) each."""
    sent = []
    for _ in range(count):
        posted = time.time()
        sent.append((posted, stack.send(api_key)))
        time.sleep(gap)
    return sent


def lags(stub: Stub, sent: list[tuple[float, dict]]) -> list[float]:
    arrived = arrivals(stub)
    return sorted(
        max(arrived[e["id"]] for e in message["events"]) - posted
        for posted, message in sent
        if all(e["id"] in arrived for e in message["events"])
    )


def delivered(stub: Stub, api_key: str, messages: list[dict]) -> bool:
    counts = stub.state()["events_by_api_key"].get(sha(api_key), {})
    return all_event_ids(messages) <= set(counts)


def dead_letters(stack: Stack) -> int:
    return int(stack.redis.hlen(KEYS.dead_letters))


def assert_each_once(stub: Stub, api_key: str, messages: list[dict]) -> None:
    counts = stub.state()["events_by_api_key"].get(sha(api_key), {})
    wanted = all_event_ids(messages)
    assert {i: counts.get(i, 0) for i in wanted} == dict.fromkeys(wanted, 1)


def max_overlap(calls: list[dict]) -> int:
    """The most calls that were open at the partner at one moment (arrival to answer)."""
    now = time.time()
    edges = []
    for call in calls:
        edges.append((call["received_at"], 1))
        edges.append((call["answered_at"] or now, -1))
    # An answer and an arrival at the same instant: the answer first, so they do not count as overlap.
    edges.sort(key=lambda edge: (edge[0], edge[1]))
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return peak


def test_a_failing_endpoint_does_not_hold_up_another_key_and_recovers_exactly_once(
    stack_of: Any, isolation_stub: Stub
) -> None:
    stack: Stack = stack_of("isolation-503")
    key_a, key_b = "ak_isolation_a_503", "ak_isolation_b_503"
    isolation_stub.faults([{"path_prefix": "/v1", "status": 503, "api_key_sha256": sha(key_a)}])
    a_messages = [stack.send(key_a) for _ in range(A_MESSAGES)]
    wait_for(lambda: len(isolation_stub.requests("/v1/events")) >= 5, 30, 0.1, "A's calls to start failing")

    sent_b = post_spaced(stack, key_b, B_MESSAGES, 0.25)
    b_messages = [message for _, message in sent_b]
    wait_for(lambda: delivered(isolation_stub, key_b, b_messages), B_DEADLINE, 0.2, "every B message delivered")
    print(f"B lags while A answers 503 (s): {[round(x, 2) for x in lags(isolation_stub, sent_b)]}")
    # A really was failing all along: none of its events reached the partner's state yet.
    assert not isolation_stub.state()["events_by_api_key"].get(sha(key_a))
    assert_each_once(isolation_stub, key_b, b_messages)

    isolation_stub.faults([])
    wait_for(
        lambda: delivered(isolation_stub, key_a, a_messages), RECOVERY_DEADLINE, 0.3, "every A message after recovery"
    )
    wait_for(stack.drained, 60, 0.2, "the queues to drain")
    assert_each_once(isolation_stub, key_a, a_messages)
    assert dead_letters(stack) == 0
    assert isolation_stub.state()["duplicates"] == 0


def test_a_hanging_endpoint_does_not_hold_up_another_key_and_stays_under_the_cap(
    stack_of: Any, isolation_stub: Stub
) -> None:
    stack: Stack = stack_of("isolation-hang", PARTNER_TIMEOUT_SECONDS="10")
    key_a, key_b = "ak_isolation_a_hang", "ak_isolation_b_hang"
    # Each of A's calls hangs 5 s, then fails: longer than a few seconds, shorter than the timeout,
    # so the stub's view of a call (arrival to answer) is the relay's too.
    isolation_stub.faults([{"path_prefix": "/v1", "status": 503, "latency_ms": 5000, "api_key_sha256": sha(key_a)}])
    a_messages = [stack.send(key_a) for _ in range(A_MESSAGES)]
    wait_for(
        lambda: any(c["status"] is None for c in isolation_stub.requests("/v1/events")),
        30,
        0.1,
        "A's first call hanging",
    )

    sent_b = post_spaced(stack, key_b, B_MESSAGES, 0.25)
    b_messages = [message for _, message in sent_b]
    wait_for(lambda: delivered(isolation_stub, key_b, b_messages), B_DEADLINE, 0.2, "every B message delivered")
    print(f"B lags while A hangs (s): {[round(x, 2) for x in lags(isolation_stub, sent_b)]}")
    assert_each_once(isolation_stub, key_b, b_messages)

    # Judged while A still hangs, then again over the whole run below.
    a_calls = [c for c in isolation_stub.requests("/v1/events") if c["api_key_sha256"] == sha(key_a)]
    assert max_overlap(a_calls) <= IN_FLIGHT_CAP, f"{max_overlap(a_calls)} of A's calls open at the partner at once"

    isolation_stub.faults([])
    wait_for(
        lambda: delivered(isolation_stub, key_a, a_messages), RECOVERY_DEADLINE, 0.3, "every A message after recovery"
    )
    wait_for(stack.drained, 60, 0.2, "the queues to drain")
    a_calls = [c for c in isolation_stub.requests("/v1/events") if c["api_key_sha256"] == sha(key_a)]
    assert max_overlap(a_calls) <= IN_FLIGHT_CAP, f"{max_overlap(a_calls)} of A's calls open at the partner at once"
    assert_each_once(isolation_stub, key_a, a_messages)
    assert dead_letters(stack) == 0


def test_two_workers_from_one_command_line_never_send_one_call_twice(
    stack_of: Any, isolation_stub: Stub, logs_dir: Path
) -> None:
    # No worker yet: the messages wait in the inbox, so both workers meet the same pending work.
    stack: Stack = stack_of("isolation-twins", workers=0)
    keys = [f"ak_isolation_twins_{n}" for n in range(4)]
    messages = [stack.send(keys[n % len(keys)]) for n in range(120)]
    assert stack.redis.xlen(KEYS.inbox) == len(messages)
    # Each call is held a moment, so two copies of one task would be at the partner together.
    isolation_stub.faults([{"path_prefix": "/v1", "status": None, "latency_ms": 200}])

    # The Procfile's line, twice, at the same moment, on one host: the same default node name.
    twins: list[Proc] = []
    try:
        twins = [start_procfile_worker(f"isolation-twin{n}", stack.env, logs_dir) for n in range(2)]
        for proc in twins:
            proc.wait_output("ready.", timeout=60)
        wait_for(
            lambda: all(delivered(isolation_stub, key, messages[n :: len(keys)]) for n, key in enumerate(keys)),
            RECOVERY_DEADLINE,
            0.3,
            "every message delivered",
        )
        wait_for(lambda: stack.drained() and stack.redis.llen(DELIVERY_QUEUE) == 0, 60, 0.2, "the queues to drain")
        time.sleep(1.0)  # a late twin would show up now
    finally:
        for proc in twins:
            proc.stop()

    calls = isolation_stub.requests("/v1")
    by_key = Counter(c["idempotency_key"] for c in calls)
    repeated = {key: n for key, n in by_key.items() if n > 1}
    assert not repeated, f"{len(repeated)} Idempotency-Keys reached the partner more than once"
    assert isolation_stub.state()["duplicates"] == 0
    counts = isolation_stub.state()["events"]
    wanted = all_event_ids(messages)
    assert {i: counts.get(i, 0) for i in wanted} == dict.fromkeys(wanted, 1)
    assert dead_letters(stack) == 0
