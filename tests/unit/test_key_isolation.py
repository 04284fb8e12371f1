"""One customer never slows another, in process: every hold of the partner gate defers the work
without spending an attempt or holding the task, an endpoint that keeps failing opens its own
breaker only, held work still ages out, and twin copies of one call never both reach the partner.
Against the suite's Redis and scripted partner clients; cool-downs are tens of milliseconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from common import dead_letters, stats
from common.marks import Marks
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import body, core_runtime, message
from workers import delivery
from workers.delivery import Action, DeadReason, Decision, Hold
from workers.gate import CallResult
from workers.mapping import plan_message
from workers.partner.base import Operation
from workers.runtime import Runtime, build_runtime
from workers.tasks import run_attempt


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _run(rt: Runtime, bodies: list[str], attempt: int = 1, first_seen_ms: int | None = None) -> Decision | None:
    return run_attempt(bodies, attempt, first_seen_ms, grouped=len(bodies) > 1, rt=rt)


def _scheduled(rt: Runtime) -> list[dict[str, Any]]:
    return [orjson.loads(member) for member in rt.redis.zrange(rt.keys.retry_schedule, 0, -1)]


def _counter(rt: Runtime, name: str) -> int:
    return int(rt.redis.hget(rt.keys.stats, name) or 0)


def _op(msg: dict[str, Any]) -> Operation:
    [op] = plan_message(msg).operations
    return op


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    made: list[Runtime] = []
    yield made
    for rt in made:
        rt.redis.close()


# Each sets up, for the API key of `op`, what makes the gate hold its call.
def _claimed(rt: Runtime, op: Operation) -> None:
    rt.redis.set(rt.keys.claim(op.idempotency_key()), "a twin's token", px=5000)


def _breaker_open(rt: Runtime, op: Operation) -> None:
    for i in range(rt.settings.breaker_failure_threshold):
        rt.gate.leave(rt.gate.enter(op.partner_key(), f"failing-{i}"), CallResult.FAILED)


def _paused(rt: Runtime, op: Operation) -> None:
    rt.gate.pause(op.partner_key(), 5.0)


def _in_flight(rt: Runtime, op: Operation) -> None:
    for i in range(rt.settings.partner_max_in_flight_per_key):
        assert rt.gate.enter(op.partner_key(), f"slow-{i}").granted  # calls that have not answered yet


def _rate_limited(rt: Runtime, op: Operation) -> None:
    assert rt.gate.enter(op.partner_key(), "earlier").granted


HOLDS: dict[Hold, tuple[Callable[[Runtime, Operation], None], dict[str, Any], float]] = {
    # hold: (set-up, settings, the wait it names, about)
    Hold.CLAIMED: (_claimed, {}, 5.0),
    Hold.BREAKER_OPEN: (_breaker_open, {"breaker_failure_threshold": 2, "breaker_cooldown_seconds": 7}, 7.0),
    Hold.PAUSED: (_paused, {}, 5.0),
    Hold.IN_FLIGHT: (_in_flight, {"partner_max_in_flight_per_key": 2}, 0.5),
    Hold.RATE_LIMITED: (_rate_limited, {"partner_rate_limit": "1/minute"}, 60.0),
}


@pytest.mark.parametrize("hold", list(HOLDS))
def test_each_hold_defers_the_same_attempt_at_once(
    hold: Hold, runtimes: list[Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_up, settings, wait = HOLDS[hold]
    partner = ScriptedPartnerClient()
    rt = core_runtime(partner, **settings)
    runtimes.append(rt)
    msg = message(api_key=f"held-{hold}")
    op = _op(msg)
    set_up(rt, op)
    leases = rt.redis.zcard(rt.keys.inflight(op.partner_key()))

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"the task slept {seconds} s")

    monkeypatch.setattr(time, "sleep", no_sleep)
    first_seen = _now_ms() - 1000
    decision = _run(rt, [body(msg)], attempt=3, first_seen_ms=first_seen)
    assert decision is not None and (decision.action, decision.attempt, decision.reason) == (Action.DEFER, 3, hold)
    assert decision.delay is not None and wait * 0.95 < decision.delay <= wait * 1.1 + 0.02
    assert not partner.calls and _counter(rt, stats.RETRIED) == 0 and _counter(rt, stats.PARTNER_CALLS) == 0
    # Rescheduled as the same attempt, its age kept; the hold took no lease and no claim.
    [entry] = _scheduled(rt)
    assert (entry["id"], entry["attempt"], entry["first_seen"]) == (msg["id"], 3, first_seen)
    assert rt.redis.zcard(rt.keys.inflight(op.partner_key())) == leases
    if hold is not Hold.CLAIMED:
        assert not rt.redis.exists(rt.keys.claim(op.idempotency_key()))


def test_a_failing_endpoint_opens_its_own_breaker_and_its_probe_closes_it(runtimes: list[Runtime]) -> None:
    partner = ScriptedPartnerClient(503, 503)
    rt = core_runtime(partner, breaker_failure_threshold=2, breaker_cooldown_seconds=0.02)
    runtimes.append(rt)
    down = [message(api_key="down") for _ in range(3)]
    assert [(d.action, d.attempt) for d in (_run(rt, [body(m)]) for m in down[:2]) if d] == [(Action.RETRY, 2)] * 2
    # The key's breaker is open: its next message waits, spending no attempt, and no call is made.
    held = _run(rt, [body(down[2])], attempt=4)
    assert held is not None and (held.action, held.attempt, held.reason) == (Action.DEFER, 4, Hold.BREAKER_OPEN)
    assert len(partner.calls) == 2 and _counter(rt, stats.BREAKER_OPENED) == 1
    assert rt.redis.zrange(rt.keys.breakers_open, 0, -1) == [_op(down[0]).partner_key().encode()]
    # Another customer is not held.
    assert _run(rt, [body(message(api_key="up"))]) == Decision(Action.DELIVERED, 1)
    time.sleep(0.03)
    # The cool-down is over: the next call is the probe; the endpoint answers, the breaker closes.
    assert _run(rt, [body(down[2])], attempt=4) == Decision(Action.DELIVERED, 4)
    assert rt.gate.state(_op(down[0]).partner_key()) == {} and rt.redis.zcard(rt.keys.breakers_open) == 0


def test_work_held_by_an_open_breaker_still_ages_out(runtimes: list[Runtime]) -> None:
    partner = ScriptedPartnerClient()
    rt = core_runtime(partner, breaker_failure_threshold=1, breaker_cooldown_seconds=5, retry_max_age_seconds=60)
    runtimes.append(rt)
    msg = message(api_key="down for good")
    _breaker_open(rt, _op(msg))
    # Deferred again and again, with the age it was accepted at...
    first_seen = _now_ms() - 30_000
    decision = _run(rt, [body(msg)], attempt=2, first_seen_ms=first_seen)
    assert decision is not None and decision.action is Action.DEFER
    [entry] = _scheduled(rt)
    assert entry["first_seen"] == first_seen
    rt.redis.delete(rt.keys.retry_schedule)
    # ...until a deferral would end past RETRY_MAX_AGE_SECONDS: then it is dead, with max_age.
    decision = _run(rt, [body(msg)], attempt=2, first_seen_ms=_now_ms() - 57_000)
    assert decision == Decision(Action.DEAD, 2, reason=DeadReason.MAX_AGE)
    letter = dead_letters.get(rt.redis, rt.keys, msg["id"])
    assert letter is not None and (letter.reason, letter.attempts) == ("max_age", 2)
    assert not partner.calls and not _scheduled(rt)


def test_a_twin_copy_is_held_while_the_call_is_in_flight_then_finds_it_delivered(runtimes: list[Runtime]) -> None:
    # Two workers (two runtimes on one Redis) got the same message: the pump published it twice.
    first_partner, second_partner = ScriptedPartnerClient(), ScriptedPartnerClient()
    first = core_runtime(first_partner)
    second = build_runtime(first.settings, partner=second_partner)
    runtimes.extend([first, second])
    msg = message(api_key="twins")
    op = _op(msg)
    during: list[Decision | None] = []
    first_partner.during_call = lambda _: during.append(_run(second, [body(msg)]))
    assert _run(first, [body(msg)]) == Decision(Action.DELIVERED, 1)
    [held] = during
    assert held is not None and (held.action, held.reason) == (Action.DEFER, Hold.CLAIMED)
    # Until the claim would have lapsed: the first copy usually answers long before.
    lease = first.settings.partner_timeout_seconds + 5
    assert held.delay is not None and lease - 1 < held.delay <= lease * 1.1 + 0.02
    assert not second_partner.calls and len(first_partner.calls) == 1
    # After the call: the gate says already delivered (and so does the plan, before it).
    assert second.gate.enter(op.partner_key(), op.idempotency_key()).already
    assert _run(second, [body(msg)]) == Decision(Action.DELIVERED, 1)
    assert not second_partner.calls and not second.redis.exists(second.keys.claim(op.idempotency_key()))


def test_a_twin_group_past_the_plan_check_finds_the_call_delivered_at_the_gate(
    runtimes: list[Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    first_partner, second_partner = ScriptedPartnerClient(), ScriptedPartnerClient()
    first = core_runtime(first_partner)
    second = build_runtime(first.settings, partner=second_partner)
    runtimes.extend([first, second])
    bodies = [body(message(api_key="twin-group")) for _ in range(2)]
    calls_for = delivery.calls_for
    raced: list[Decision | None] = []

    def the_other_copy_goes_first(members: Any) -> Any:
        # The second copy has planned (no mark yet); the first copy delivers before its gate.
        if not raced:
            monkeypatch.setattr(delivery, "calls_for", calls_for)
            raced.append(_run(first, bodies))
        return calls_for(members)

    monkeypatch.setattr(delivery, "calls_for", the_other_copy_goes_first)
    assert _run(second, bodies) == Decision(Action.DELIVERED, 1)
    assert raced == [Decision(Action.DELIVERED, 1)]
    [(_, key)] = first_partner.calls
    assert not second_partner.calls
    # The merged call's own mark is written besides its members': that is what the gate found.
    assert Marks(first.redis, first.keys, first.settings.dedup_ttl_seconds).delivered([key]) == [True]


def test_a_partner_client_that_raises_gives_back_its_claim_and_lease(runtimes: list[Runtime]) -> None:
    partner = ScriptedPartnerClient(RuntimeError("a bug in the partner client"))
    rt = core_runtime(partner)
    runtimes.append(rt)
    msg = message(api_key="raising")
    op = _op(msg)
    with pytest.raises(RuntimeError):
        delivery.attempt_delivery([body(msg)], rt)
    assert not rt.redis.exists(rt.keys.claim(op.idempotency_key()))
    assert rt.redis.zcard(rt.keys.inflight(op.partner_key())) == 0
    assert rt.gate.state(op.partner_key()) == {}  # no answer to learn from
