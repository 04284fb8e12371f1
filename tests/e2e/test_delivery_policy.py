"""The delivery policy with the real thing: Redis, gunicorn, Celery worker processes and the
partner stub injecting faults. Waits are shortened through configuration, never by mocking
a clock of the system under test.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskCliRunner

from common import dead_letters
from common.config import Settings
from common.keys import partner_key
from devtools.procs import start_worker
from service import create_app
from tests.support import BATCHING_DB, POLICY_DB, Stub, wait_for
from tests.support.stack import KEYS, Stack, all_event_ids, calls_for, delivered_events, make_stack, sha


@pytest.fixture(scope="module")
def stack(stub: Stub, logs_dir: Path) -> Iterator[Stack]:
    s = make_stack(
        POLICY_DB,
        stub,
        logs_dir,
        "policy",
        PARTNER_RATE_LIMIT="1000/second",
        BROKER_VISIBILITY_TIMEOUT="6",
        PUMP_CLAIM_IDLE_MS="2000",
    )
    yield s
    s.stop()


@pytest.fixture
def partner(stack: Stack, stub: Stub) -> Stub:
    return stack.quiet(stub)


def test_503_burst_then_recovery_delivers_everything_once(stack: Stack, partner: Stub) -> None:
    partner.faults([{"path_prefix": "/v1/events", "status": 503, "times": 4}])
    messages = [stack.send("burst-key") for _ in range(10)]
    expected = all_event_ids(messages)
    wait_for(lambda: set(delivered_events(partner, "burst-key")) == expected, 60, what="all events delivered")
    wait_for(stack.drained, 30, what="queues to drain")
    assert set(delivered_events(partner, "burst-key").values()) == {1}
    calls = calls_for(partner, "burst-key")
    assert sum(c["status"] == 503 for c in calls) == 4
    accepted = [c for c in calls if c["status"] == 202]
    # Every message went in exactly one accepted call (calls carry several users' batches).
    assert sorted(b["message_id"] for c in accepted for b in c["body"]["batches"]) == sorted(m["id"] for m in messages)
    # A retried call is the same payload under the same key: failed keys reappear as accepted ones.
    assert {c["idempotency_key"] for c in calls if c["status"] == 503} <= {c["idempotency_key"] for c in accepted}
    assert partner.state()["duplicates"] == 0
    assert not [m["id"] for m in messages if dead_letters.get(stack.redis, KEYS, m["id"])]


def test_429_with_retry_after_pauses_the_whole_key(stack: Stack, partner: Stub) -> None:
    partner.faults([{"path_prefix": "/v1/events", "status": 429, "retry_after": "2", "times": 1}])
    first = stack.send("pause-key")
    # Answered, not just received: the status is filled in when the answer leaves the stub.
    [throttled] = wait_for(
        lambda: [c for c in calls_for(partner, "pause-key") if c["status"] is not None], 30, what="the 429"
    )
    assert throttled["status"] == 429
    # The relay has learned of the 429 (its pause is in Redis, or it has already called again)
    # before more arrives: otherwise a loaded machine could dispatch one of them in between.
    pause = KEYS.pause(partner_key("pause-key"))
    wait_for(
        lambda: stack.redis.exists(pause) or len(calls_for(partner, "pause-key")) > 1, 30, what="the relay to pause"
    )
    more = [stack.send("pause-key") for _ in range(4)]
    expected = all_event_ids([first, *more])
    wait_for(lambda: set(delivered_events(partner, "pause-key")) == expected, 60, what="delivery after the pause")
    later = [c for c in calls_for(partner, "pause-key") if c["seq"] != throttled["seq"]]
    assert later
    # No call to that key, from any task, before Retry-After had passed since the 429's answer.
    assert min(c["received_at"] for c in later) >= throttled["answered_at"] + 2.0


def test_permanent_400_is_dead_lettered_at_once_then_replayed(
    stack: Stack, partner: Stub, flask_cli: FlaskCliRunner
) -> None:
    partner.faults([{"path_prefix": "/v1/events", "status": 400, "api_key_sha256": sha("reject-key")}])
    message = stack.send("reject-key")
    letter = wait_for(lambda: dead_letters.get(stack.redis, KEYS, message["id"]), 30, what="the dead letter")
    assert (letter.reason, letter.last_status, letter.attempts) == ("partner_rejected", 400, 1)
    assert len(calls_for(partner, "reject-key")) == 1

    listing = flask_cli.invoke(args=["dlq", "list", "--json"])
    assert listing.exit_code == 0 and message["id"] in listing.output
    shown = flask_cli.invoke(args=["dlq", "show", message["id"]])
    assert shown.exit_code == 0 and "reject-key" not in shown.output and "partner_rejected" in shown.output

    partner.faults([])  # the partner fixed its side
    replayed = flask_cli.invoke(args=["dlq", "replay", message["id"]])
    assert replayed.exit_code == 0, replayed.output
    expected = all_event_ids([message])
    wait_for(lambda: set(delivered_events(partner, "reject-key")) == expected, 30, what="the replay delivered")
    assert dead_letters.get(stack.redis, KEYS, message["id"]) is None
    assert [c["status"] for c in calls_for(partner, "reject-key")] == [400, 202]


def test_max_attempts_ends_in_the_dead_letters_with_the_reason(stack: Stack, partner: Stub) -> None:
    partner.faults([{"path_prefix": "/v1/events", "status": 503, "api_key_sha256": sha("down-key")}])
    message = stack.send("down-key")
    letter = wait_for(lambda: dead_letters.get(stack.redis, KEYS, message["id"]), 60, what="the dead letter")
    assert (letter.reason, letter.last_status, letter.attempts) == ("max_attempts", 503, 5)
    calls = calls_for(partner, "down-key")
    assert len(calls) == 5 and len({c["idempotency_key"] for c in calls}) == 1


def test_worker_killed_mid_call_delivers_anyway(stack: Stack, partner: Stub) -> None:
    partner.faults([{"path_prefix": "/v1/events", "status": None, "latency_ms": 3000, "times": 1}])
    message = stack.send("kill-key")
    wait_for(lambda: calls_for(partner, "kill-key"), 30, what="the call to be in flight")
    victim = stack.workers.pop(0)
    victim.signal(signal.SIGKILL)  # the whole worker: main process and pool, no goodbye
    victim.popen.wait(10)
    victim.stop()
    stack.workers.insert(0, start_worker("policy-worker-respawn", stack.env, stack.logs_dir))
    expected = all_event_ids([message])
    # The stub finished applying the killed call; the message comes back after the
    # visibility timeout and its repeat is recognised by the same Idempotency-Key.
    wait_for(lambda: len(calls_for(partner, "kill-key")) >= 2, 60, what="the message to be delivered again")
    wait_for(stack.drained, 30, what="queues to drain")
    assert delivered_events(partner, "kill-key") == {i: 1 for i in expected}
    assert len({c["idempotency_key"] for c in calls_for(partner, "kill-key")}) == 1


@pytest.fixture
def flask_cli(stack: Stack) -> FlaskCliRunner:
    app = create_app(Settings(redis_url=stack.redis_url, broker_url=stack.redis_url))
    return app.test_cli_runner()


def test_rate_limit_holds_across_worker_processes(stub: Stub, logs_dir: Path) -> None:
    limit, period, margin = 5, 1.0, 1.0
    # One message a call, so the partner sees as many calls as messages.
    s = make_stack(
        BATCHING_DB,
        stub,
        logs_dir,
        "rate",
        workers=2,
        PARTNER_RATE_LIMIT=f"{limit}/second",
        DELIVERY_BATCH_MAX_MESSAGES="1",
        # The gate counts `limit` decisions per period + margin; the partner counts arrivals per
        # period. Arrivals in any period were then decided within period + the spread of the delays
        # from decision to arrival, so the partner sees at most `limit` as long as that spread is
        # under the margin. Production needs 50 ms; a shared, loaded test machine gets a whole second.
        RATE_LIMIT_MARGIN_MS=str(int(margin * 1000)),
    )
    try:
        messages = [s.send("rated-key", events=1) for _ in range(24)]
        expected = all_event_ids(messages)
        # At `limit` per period + margin, 24 calls take about 9 s; the deadline only bounds a broken run.
        wait_for(lambda: set(delivered_events(stub, "rated-key")) == expected, 180, what="every rated message")
        times = sorted(c["received_at"] for c in calls_for(stub, "rated-key"))
        assert len(times) == 24
        # By the partner's clock: every window of one period, wherever it starts. Two worker
        # processes with a limit each would put up to 2 x limit in one.
        busiest = max(sum(1 for t in times if start <= t < start + period) for start in times)
        assert busiest <= limit, f"{busiest} calls in one period at the partner, limit {limit}: {times}"
        waits = int(s.redis.hget(KEYS.stats, "rate_limited_waits") or 0)
        assert waits > 0
    finally:
        s.stop()


def test_event_batches_for_one_key_share_partner_calls(stub: Stub, logs_dir: Path) -> None:
    s = make_stack(
        BATCHING_DB, stub, logs_dir, "batching", DELIVERY_BATCH_WAIT_MS="300", DELIVERY_BATCH_MAX_MESSAGES="10"
    )
    try:
        messages = [s.send("batched-key", events=3) for _ in range(30)]
        messages += [s.send("other-key", events=1) for _ in range(3)]
        wait_for(
            lambda: set(delivered_events(stub, "batched-key")) == all_event_ids(messages[:30]),
            60,
            what="the batched key's events",
        )
        wait_for(s.drained, 30, what="queues to drain")
        calls = calls_for(stub, "batched-key")
        assert len(calls) < 30
        assert max(len(c["body"]["batches"]) for c in calls) <= 10
        # One call never mixes customers.
        assert all(b["message_id"] in {m["id"] for m in messages[:30]} for c in calls for b in c["body"]["batches"])
        assert set(delivered_events(stub, "batched-key").values()) == {1}
        assert set(delivered_events(stub, "other-key")) == all_event_ids(messages[30:])
    finally:
        s.stop()
