"""The delivery decision: `decide` as a plain function, then plan → gate → send → decide in
process, against the suite's Redis and a scripted partner client."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import orjson
import pytest

from common import dead_letters, stats
from common.config import Settings
from common.keys import partner_key
from common.marks import Marks
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import (
    MEMBERSHIP_MESSAGE,
    SUBSCRIPTION_MESSAGE,
    body,
    core_runtime,
    message,
    run_inbox,
)
from workers.delivery import (
    Action,
    DeadReason,
    Decision,
    Hold,
    Outcome,
    Verdict,
    attempt_delivery,
    calls_for,
    decide,
    plan,
)
from workers.grouping import GROUP, UNIT, plan_jobs
from workers.mapping import plan_message
from workers.partner.base import Operation, OperationKind, PartnerResult
from workers.runtime import Runtime
from workers.tasks import run_attempt
from workers.units import unit_id

NOW_MS = 1_700_000_000_000


class Highest:
    """A jitter that always draws the top of the range: the longest backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _decide(outcome: Outcome, attempt: int = 1, age_s: float = 0.0, **changes: object) -> Decision:
    settings = Settings(retry_max_attempts=5, retry_backoff_base=1.0, retry_backoff_max=30.0, **changes)  # type: ignore[arg-type]
    return decide(
        outcome,
        attempt=attempt,
        first_seen_ms=NOW_MS - int(age_s * 1000),
        now_ms=NOW_MS,
        settings=settings,
        rng=random.Random(attempt),
    )


# ---------------------------------------------------------------- decide, a plain function


def test_taken_work_is_delivered() -> None:
    assert _decide(Outcome(last_status=202, sent=1)) == Decision(Action.DELIVERED, 1)
    assert _decide(Outcome()) == Decision(Action.DELIVERED, 1)  # nothing was left to send


def test_transient_failure_retries_with_a_bounded_backoff() -> None:
    for attempt in range(1, 5):
        decision = _decide(Outcome(Verdict.TRANSIENT, last_status=503), attempt)
        assert (decision.action, decision.attempt, decision.reason) == (Action.RETRY, attempt + 1, "partner_transient")
        assert decision.delay is not None and 0 <= decision.delay <= min(30.0, 2 ** (attempt - 1))


def test_retry_after_is_honoured_and_capped() -> None:
    decision = _decide(Outcome(Verdict.TRANSIENT, wait=7.0, last_status=429))
    assert decision.action is Action.RETRY and decision.delay is not None and decision.delay >= 7.0
    capped = _decide(Outcome(Verdict.TRANSIENT, wait=10.0**9), retry_after_max_seconds=60.0)
    assert capped.delay == 60.0


def test_the_last_attempt_is_dead_with_max_attempts() -> None:
    decision = _decide(Outcome(Verdict.TRANSIENT, last_status=503), attempt=5)
    assert decision == Decision(Action.DEAD, 5, reason=DeadReason.MAX_ATTEMPTS)


def test_work_too_old_to_retry_is_dead_with_max_age() -> None:
    old = _decide(Outcome(Verdict.TRANSIENT), attempt=2, age_s=3601, retry_max_age_seconds=3600)
    assert old == Decision(Action.DEAD, 2, reason=DeadReason.MAX_AGE)
    # The age counts when the retry would run: a backoff that would end past it is dead now.
    settings = Settings(retry_backoff_base=10.0, retry_backoff_max=10.0, retry_max_age_seconds=3600)
    outcome = Outcome(Verdict.TRANSIENT)
    late = decide(outcome, attempt=2, first_seen_ms=NOW_MS - 3595_000, now_ms=NOW_MS, settings=settings, rng=Highest())
    assert late.reason is DeadReason.MAX_AGE
    early = decide(outcome, attempt=2, first_seen_ms=NOW_MS - 3500_000, now_ms=NOW_MS, settings=settings, rng=Highest())
    assert early.action is Action.RETRY and early.delay == 10.0


def test_partial_success_starts_the_count_again() -> None:
    decision = _decide(Outcome(Verdict.TRANSIENT, last_status=503, sent=1), attempt=4)
    assert (decision.action, decision.attempt) == (Action.RETRY, 2)


@pytest.mark.parametrize("hold", list(Hold))
def test_a_gate_defers_without_spending_an_attempt(hold: Hold) -> None:
    held = _decide(Outcome(hold=hold, wait=3.0), attempt=5, age_s=100)
    assert (held.action, held.attempt, held.reason) == (Action.DEFER, 5, hold)
    # A little later than the gate's wait, never earlier: a held herd comes back spread out.
    assert held.delay is not None and 3.0 <= held.delay <= 3.3
    delays = {_decide(Outcome(hold=hold, wait=0.001), attempt=a).delay for a in range(1, 6)}
    assert len(delays) == 5 and all(d is not None and 0.001 <= d <= 0.021 for d in delays)
    assert 1.0 <= (_decide(Outcome(hold=hold), attempt=2).delay or 0) <= 1.1  # no wait named: about 1 s


def test_held_work_too_old_is_dead_with_max_age() -> None:
    # An endpoint down for a day holds its breaker open that long: the age still applies.
    old = _decide(Outcome(hold=Hold.BREAKER_OPEN, wait=300.0), attempt=3, age_s=3601, retry_max_age_seconds=3600)
    assert old == Decision(Action.DEAD, 3, reason=DeadReason.MAX_AGE)
    late = _decide(Outcome(hold=Hold.BREAKER_OPEN, wait=300.0), attempt=3, age_s=3400, retry_max_age_seconds=3600)
    assert late.reason is DeadReason.MAX_AGE  # the deferral would end past the age
    young = _decide(Outcome(hold=Hold.BREAKER_OPEN, wait=300.0), attempt=3, age_s=60, retry_max_age_seconds=3600)
    assert young.action is Action.DEFER


def test_a_permanent_answer_is_dead_at_once() -> None:
    decision = _decide(Outcome(Verdict.PERMANENT, last_status=400), attempt=1)
    assert decision == Decision(Action.DEAD, 1, reason=DeadReason.PARTNER_REJECTED)


def test_operation_kinds_keep_their_values_and_keys() -> None:
    assert [kind.value for kind in OperationKind] == [
        "events",
        "audience_upsert",
        "audience_delete",
        "members",
        "erase",
    ]
    # Pinned: queued work and replays must keep the key they were first sent with.
    op = Operation(OperationKind.EVENTS, {"b": 1, "a": [1, 2]}, "key", message_id="m1")
    assert op.idempotency_key() == "54e29d75951ddcde0debac46fafcf09e3d8a282f960ac60e99c766ae4975b3b4"
    members = Operation(OperationKind.MEMBERS, {"changes": []}, "key", audience_id=7, message_id="m2")
    assert members.idempotency_key() == "5a1df40a2954b4429afe4692e827f4e529221f4ff7be33d1de032edc0e6d6d71"


# ---------------------------------------------------------------- in process, on Redis


def _run(rt: Runtime, bodies: list[str], attempt: int = 1, first_seen_ms: int | None = None) -> Decision | None:
    return run_attempt(bodies, attempt, first_seen_ms, grouped=len(bodies) > 1, rt=rt)


def _scheduled(rt: Runtime) -> list[dict[str, Any]]:
    return [orjson.loads(member) for member in rt.redis.zrange(rt.keys.retry_schedule, 0, -1)]


def _counter(rt: Runtime, name: str) -> int:
    return int(rt.redis.hget(rt.keys.stats, name) or 0)


def test_delivered_marks_are_written_after_and_stop_a_second_send(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message()
    [op] = plan_message(msg).operations
    marks = Marks(rt.redis, rt.keys, rt.settings.dedup_ttl_seconds)
    seen: list[bool] = []
    partner.during_call = lambda _: seen.extend(marks.delivered([op.idempotency_key()]))
    assert _run(rt, [body(msg)]) == Decision(Action.DELIVERED, 1)
    assert seen == [False] and marks.delivered([op.idempotency_key()]) == [True]
    assert partner.keys == [op.idempotency_key()]
    # The pump published it twice, or mParticle replayed it: no second call, still delivered.
    assert _run(rt, [body(msg)]) == Decision(Action.DELIVERED, 1)
    assert len(partner.calls) == 1
    assert _counter(rt, stats.DELIVERED) == 2 and _counter(rt, stats.PARTNER_CALLS) == 1


def test_a_group_is_one_call_under_the_key_of_its_members(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msgs = [message(api_key="k1"), message(api_key="k1"), message(api_key="k1")]
    result = attempt_delivery([body(m) for m in msgs], rt)
    [(op, key)] = partner.calls
    batches = [b for m in msgs for b in plan_message(m).operations[0].payload["batches"]]
    expected = Operation(OperationKind.EVENTS, {"batches": batches}, "k1", message_id=",".join(m["id"] for m in msgs))
    assert key == expected.idempotency_key() and op == expected
    assert len(result.delivered) == 3 and not result.pending and result.message_id == "group of 3"
    # Each member is marked under its own key: alone or in another group, it is never sent again.
    marks = Marks(rt.redis, rt.keys, rt.settings.dedup_ttl_seconds)
    assert marks.delivered([plan_message(m).operations[0].idempotency_key() for m in msgs]) == [True] * 3


def test_a_single_message_is_a_group_of_one(rt: Runtime) -> None:
    msgs = [message(MEMBERSHIP_MESSAGE, api_key="k2")]
    members, rejected = plan([body(m) for m in msgs], rt)
    calls = calls_for(members)
    assert not rejected and [c.operation for c in calls] == plan_message(msgs[0]).operations
    [event_member], _ = plan([body(message(api_key="k2"))], rt)
    [call] = calls_for([event_member])
    assert call.operation == event_member.operations[0] and call.marks == event_member.marks


def test_a_failed_group_is_retried_as_the_same_group(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    partner.answers = [503]
    bodies = [body(message(api_key="k3")) for _ in range(2)]
    first_seen = time.time_ns() // 1_000_000 - 5000
    decision = _run(rt, bodies, first_seen_ms=first_seen)
    assert decision is not None and (decision.action, decision.attempt) == (Action.RETRY, 2)
    [entry] = _scheduled(rt)
    assert (entry["type"], entry["attempt"], entry["first_seen"]) == (GROUP, 2, first_seen)
    assert orjson.loads(entry["body"]) == bodies and _counter(rt, stats.RETRIED) == 1
    # Back in its lane, the pump's grouping keeps it whole, and it goes under the same key.
    rt.redis.zadd(rt.keys.retry_schedule, {orjson.dumps(entry): 0}, xx=True)
    assert rt.retries.move_due(10) == 1
    [(entry_id, fields)] = rt.redis.xrange(rt.keys.lane(partner_key("k3")))
    [job] = plan_jobs([(entry_id, fields)], max_messages=50, max_events=1000)
    assert (job.task, job.bodies, job.attempt) == ("events", bodies, 2)
    assert _run(rt, job.bodies, job.attempt, job.first_seen_ms) == Decision(Action.DELIVERED, 2)
    assert len(set(partner.keys)) == 1 and len(partner.keys) == 2


def test_a_single_message_is_rescheduled_as_itself(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    partner.answers = [None]  # no answer: a timeout
    msg = message()
    decision = _run(rt, [body(msg)], attempt=3)
    assert decision is not None and (decision.action, decision.attempt) == (Action.RETRY, 4)
    [entry] = _scheduled(rt)
    assert (entry["id"], entry["type"], entry["attempt"], entry["body"]) == (msg["id"], msg["type"], 4, body(msg))


def test_group_members_that_are_invalid_are_dead_lettered_one_by_one(
    rt: Runtime, partner: ScriptedPartnerClient
) -> None:
    good = message(api_key="k4")
    invalid = message(api_key="k4")
    invalid["events"] = "not a list"
    no_key = message(api_key="k4")
    del no_key["account"]["account_settings"]["apiKey"]
    bodies = [body(good), "{not json", body(invalid), body(no_key)]
    assert _run(rt, bodies) == Decision(Action.DELIVERED, 1)
    assert len(partner.calls) == 1 and partner.calls[0][0].payload["batches"][0]["message_id"] == good["id"]
    letters = {letter.reason: letter for letter in dead_letters.list_letters(rt.redis, rt.keys)}
    assert set(letters) == {"invalid_json", "invalid_message", "missing_api_key"}
    assert letters["invalid_message"].id == invalid["id"] and letters["missing_api_key"].id == no_key["id"]
    assert letters["invalid_json"].body == "{not json"
    assert _counter(rt, stats.DELIVERED) == 1 and _counter(rt, stats.DEAD_LETTERED) == 3


def test_a_rejected_group_dead_letters_each_member_with_its_own_id(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    partner.answers = [400]
    msgs = [message(api_key="k5") for _ in range(3)]
    decision = _run(rt, [body(m) for m in msgs], attempt=2)
    assert decision == Decision(Action.DEAD, 2, reason=DeadReason.PARTNER_REJECTED)
    letters = dead_letters.list_letters(rt.redis, rt.keys)
    assert sorted(letter.id for letter in letters) == sorted(m["id"] for m in msgs)
    assert {(letter.reason, letter.last_status, letter.attempts) for letter in letters} == {
        ("partner_rejected", 400, 2)
    }
    assert not _scheduled(rt)


def test_max_attempts_and_max_age_end_in_the_dead_letters(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    partner.default = 503
    tired = message()
    _run(rt, [body(tired)], attempt=rt.settings.retry_max_attempts)
    old = message()
    too_old = time.time_ns() // 1_000_000 - (rt.settings.retry_max_age_seconds + 1) * 1000
    _run(rt, [body(old)], attempt=1, first_seen_ms=too_old)
    tired_letter = dead_letters.get(rt.redis, rt.keys, tired["id"])
    old_letter = dead_letters.get(rt.redis, rt.keys, old["id"])
    assert tired_letter is not None and old_letter is not None
    assert (tired_letter.reason, tired_letter.last_status, tired_letter.attempts) == ("max_attempts", 503, 8)
    assert (old_letter.reason, old_letter.attempts) == ("max_age", 1)
    assert not _scheduled(rt)


def test_partial_success_retries_only_what_is_left_from_attempt_two(
    rt: Runtime, partner: ScriptedPartnerClient
) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="k6")
    ops = plan_message(msg).operations
    assert len(ops) == 3
    partner.answers = [200, 503]
    # run_attempt splits such a message into units (test_message_units.py); an attempt that still
    # holds several calls keeps the rule.
    result = attempt_delivery([body(msg)], rt)
    now = time.time_ns() // 1_000_000
    decision = decide(result.outcome, attempt=4, first_seen_ms=now, now_ms=now, settings=rt.settings)
    assert (result.outcome.sent, decision.action, decision.attempt) == (1, Action.RETRY, 2)
    partner.calls.clear()
    result = attempt_delivery([body(msg)], rt)
    assert result.outcome.verdict is Verdict.OK and len(result.delivered) == 1
    assert [op.audience_id for op, _ in partner.calls] == [ops[1].audience_id, ops[2].audience_id]


def test_a_busy_audience_defers_the_same_attempt(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="k7")
    first, *others = plan_message(msg).operations
    assert _run(rt, [body(msg)], attempt=3) is None  # split: one unit per audience
    with rt.audiences.locked(first) as held:  # another task's call to that audience is in flight
        assert held
        decisions = [decision for _, decision in run_inbox(rt)]
    [held, *rest] = decisions
    assert (held.action, held.attempt, held.reason) == (Action.DEFER, 1, Hold.AUDIENCE_BUSY)
    # At once, not after a wait: again when the holder is likely done (its TTL, capped at 1 s).
    assert held.delay is not None and 1.0 <= held.delay <= 1.1
    assert rest == [Decision(Action.DELIVERED, 1)] * 2
    assert [op for op, _ in partner.calls] == others and _counter(rt, stats.RETRIED) == 0
    [entry] = _scheduled(rt)
    assert (entry["id"], entry["type"], entry["attempt"]) == (unit_id(first), UNIT, 1)


def test_a_member_call_holds_the_audience_lock_and_records_what_it_sent(
    rt: Runtime, partner: ScriptedPartnerClient
) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="k8")
    ops = plan_message(msg).operations
    locks: list[bool] = []

    def busy(op: Operation) -> None:
        with rt.audiences.locked(op) as held:
            locks.append(bool(held))

    partner.during_call = busy
    assert _run(rt, [body(msg)]) is None  # split: one unit per audience
    assert [decision for _, decision in run_inbox(rt)] == [Decision(Action.DELIVERED, 1)] * len(ops)
    assert locks == [False] * len(ops)
    # Replayed under a new id (so new delivered marks) and older, the changes are not sent again
    # (as old as what the partner has, they would be: equal timestamps apply in arrival order).
    partner.calls.clear()
    partner.during_call = None
    again = dict(msg, id="0b9e5f8e-0000-4000-8000-000000000000", timestamp_ms=msg["timestamp_ms"] - 1)
    assert _run(rt, [body(again)]) is None
    assert [decision for _, decision in run_inbox(rt)] == [Decision(Action.DELIVERED, 1)] * len(ops)
    assert not partner.calls


def test_401_on_an_audience_call_sets_the_suspension_flag(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message(SUBSCRIPTION_MESSAGE, api_key="k9")
    flag = rt.keys.suspended(msg["account"]["account_id"])
    partner.answers = [401]
    assert _run(rt, [body(msg)]) == Decision(Action.DEAD, 1, reason=DeadReason.PARTNER_REJECTED)
    [op] = plan_message(msg).operations
    assert rt.redis.get(flag) == op.partner_key().encode()
    retry = dict(msg, id="0b9e5f8e-0000-4000-8000-000000000001")
    assert _run(rt, [body(retry)]) == Decision(Action.DELIVERED, 1)
    assert not rt.redis.exists(flag)


def test_401_on_events_suspends_nothing(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message(api_key="k10")
    partner.answers = [401]
    _run(rt, [body(msg)])
    assert not rt.redis.exists(rt.keys.suspended(msg["account"]["account_id"]))


def test_429_pauses_the_whole_api_key(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    partner.answers = [PartnerResult(429, retry_after=5.0, error="HTTP 429")]
    msg = message(api_key="k11")
    decision = _run(rt, [body(msg)])
    assert decision is not None and decision.action is Action.RETRY and decision.delay is not None
    assert decision.delay >= 5.0
    [op] = plan_message(msg).operations
    paused = rt.gate.enter(op.partner_key(), "other work")
    assert paused.hold is Hold.PAUSED and 4.0 < paused.wait <= 5.0
    # Any other task's call to that key is deferred, not sent, and spends no attempt.
    other = message(api_key="k11")
    deferred = _run(rt, [body(other)], attempt=2)
    assert deferred is not None and (deferred.action, deferred.attempt) == (Action.DEFER, 2)
    assert deferred.reason is Hold.PAUSED and deferred.delay is not None and 4.0 < deferred.delay <= 5.5
    assert len(partner.calls) == 1
    # Throttling is no failure of the endpoint: the breaker counts nothing.
    assert rt.gate.state(op.partner_key()) == {}


def test_over_the_rate_limit_defers_the_same_attempt() -> None:
    partner = ScriptedPartnerClient()
    rt = core_runtime(partner, partner_rate_limit="1/second")
    assert _run(rt, [body(message(api_key="k12"))]) == Decision(Action.DELIVERED, 1)
    decision = _run(rt, [body(message(api_key="k12"))], attempt=4)
    assert decision is not None and (decision.action, decision.attempt, decision.reason) == (
        Action.DEFER,
        4,
        Hold.RATE_LIMITED,
    )
    assert decision.delay is not None and 0 < decision.delay <= 1.2
    assert len(partner.calls) == 1 and _counter(rt, stats.RATE_LIMITED) == 1


def test_a_short_rate_limit_wait_is_deferred_too_never_slept(monkeypatch: pytest.MonkeyPatch) -> None:
    partner = ScriptedPartnerClient()
    rt = core_runtime(partner, partner_rate_limit="1/second", rate_limit_margin_ms=0)
    rt.gate.window_ms = 30  # a 30 ms window: the wait is short, and still not slept
    monkeypatch.setattr(time, "sleep", _no_sleep)
    bodies = [body(message(api_key="k13")) for _ in range(2)]
    assert _run(rt, bodies[:1]) == Decision(Action.DELIVERED, 1)
    decision = _run(rt, bodies[1:])
    assert decision is not None and (decision.action, decision.reason) == (Action.DEFER, Hold.RATE_LIMITED)
    assert decision.delay is not None and 0 < decision.delay <= 0.06
    assert len(partner.calls) == 1 and _counter(rt, stats.RATE_LIMITED) == 1


def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"the task slept {seconds} s")


def test_every_attempt_is_logged(rt: Runtime, partner: ScriptedPartnerClient, caplog: pytest.LogCaptureFixture) -> None:
    partner.answers = [503]
    msg = message()
    with caplog.at_level(logging.INFO, logger="workers.tasks"):
        _run(rt, [body(msg)])
        _run(rt, [body(msg)], attempt=2)
    records = [r for r in caplog.records if getattr(r, "event", None) == "delivery_attempt"]
    assert [(r.outcome, r.reason, r.status, r.attempt) for r in records] == [
        ("retry", "partner_transient", 503, 1),
        ("delivered", None, 200, 2),
    ]
    assert all(r.message_id == msg["id"] and r.account_id == msg["account"]["account_id"] for r in records)


# ------------------------------------------------------------ the audience's own changes


def _subscription(api_key: str, audience_id: int, action: str, timestamp_ms: int) -> str:
    msg = message(SUBSCRIPTION_MESSAGE, api_key=api_key)
    msg.update(audience_id=audience_id, action=action, timestamp_ms=timestamp_ms, audience_name=f"A ({action})")
    return body(msg)


def test_a_late_subscription_change_never_undoes_a_newer_one(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    """Two workers' threads may run an `add` and its `update` in either order: the older one,
    arriving second, is dropped, and the partner ends with the newer one."""
    update, add = _subscription("sub-k", 77, "update", 2000), _subscription("sub-k", 77, "add", 1000)
    assert _run(rt, [update]) == Decision(Action.DELIVERED, 1)
    assert _run(rt, [add]) == Decision(Action.DELIVERED, 1)
    assert [op.payload["name"] for op, _ in partner.calls] == ["A (update)"]
    remove = _subscription("sub-k", 77, "remove", 3000)
    assert _run(rt, [remove]) == Decision(Action.DELIVERED, 1)
    assert _run(rt, [_subscription("sub-k", 77, "update", 2500)]) == Decision(Action.DELIVERED, 1)
    assert [op.kind for op, _ in partner.calls] == [OperationKind.AUDIENCE_UPSERT, OperationKind.AUDIENCE_DELETE]


def test_a_subscription_change_waits_for_the_audiences_lock(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    [op] = plan_message(orjson.loads(_subscription("sub-l", 78, "add", 1000))).operations
    with rt.audiences.locked(op) as lock:  # another thread's call to this audience is in flight
        assert lock
        decision = _run(rt, [_subscription("sub-l", 78, "update", 2000)])
    assert decision is not None and (decision.action, decision.reason) == (Action.DEFER, Hold.AUDIENCE_BUSY)
    assert not partner.calls
