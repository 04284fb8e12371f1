"""Big messages split into units (workers/units.py): one unit of work per partner operation."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
import pytest

from common import dead_letters
from common.keys import partner_key
from tests.support import sample
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import (
    MEMBERSHIP_MESSAGE,
    SUBSCRIPTION_MESSAGE,
    body,
    message,
    run_inbox,
    take_inbox,
)
from workers import units
from workers.delivery import Action, DeadReason, Decision, attempt_delivery
from workers.grouping import UNIT, lane_of, plan_jobs
from workers.mapping import plan_message
from workers.partner.base import Operation, OperationKind
from workers.runtime import Runtime
from workers.tasks import run_attempt


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _split(rt: Runtime, msg: dict[str, Any], first_seen_ms: int | None = None) -> Decision | None:
    return run_attempt([body(msg)], 1, first_seen_ms, grouped=False, rt=rt)


def _counter(rt: Runtime, name: str) -> int:
    return int(rt.redis.hget(rt.keys.stats, name) or 0)


def _keys(msg: dict[str, Any]) -> list[str]:
    return [op.idempotency_key() for op in plan_message(msg).operations]


def _wide_membership(audiences: int, api_key: str) -> dict[str, Any]:
    msg = message(MEMBERSHIP_MESSAGE, api_key=api_key)
    profile = msg["user_profiles"][0]
    profile["audiences"] = [
        {"audience_id": 1000 + i, "audience_name": f"aud {i}", "action": "add"} for i in range(audiences)
    ]
    msg["user_profiles"] = [profile]
    return msg


# ---------------------------------------------------------------- plain functions


@pytest.mark.parametrize("version", ["2.1.0", "3.2.0"])
def test_a_unit_body_decodes_to_the_same_operation_and_idempotency_key(version: str) -> None:
    msg = orjson.loads(sample(version, "AudienceMembershipChangeRequest.json"))
    msg["account"]["account_settings"]["apiKey"] = "secret-key"
    planned = plan_message(msg)
    assert len(planned.operations) > 1
    for op in planned.operations:
        encoded = units.encode(op, account_id=planned.account_id, message_type=planned.message_type)
        assert units.is_unit_body(encoded)
        unit = units.decode(orjson.loads(encoded))
        assert unit.operation == op and unit.operation.idempotency_key() == op.idempotency_key()
        assert (unit.message_id, unit.account_id, unit.message_type) == (msg["id"], planned.account_id, msg["type"])


def test_only_unit_bodies_are_units() -> None:
    msg = message(MEMBERSHIP_MESSAGE)
    assert not units.is_unit(msg) and not units.is_unit_body(body(msg))
    # A message claiming to be a unit still has a type: it is a message (and the envelope check's).
    assert not units.is_unit(dict(msg, unit=1))
    op = Operation(OperationKind.MEMBERS, {"changes": []}, "k", 7, "m-1")
    good = orjson.loads(units.encode(op, account_id=1, message_type=MEMBERSHIP_MESSAGE))
    for broken, error in [
        (dict(good, unit=2), "version"),
        (dict(good, kind="teleport"), "kind"),
        (dict(good, account={"account_id": 1, "account_settings": {"apiKey": ""}}), "apiKey"),
        (dict(good, account=None), "account"),
        (dict(good, payload=[]), "payload"),
        (dict(good, audience_id=True), "audience_id"),
        (dict(good, account={"account_id": "1", "account_settings": {"apiKey": "k"}}), "account_id"),
    ]:
        with pytest.raises(units.UnitInvalid, match=error):
            units.decode(broken)


def test_the_split_decision() -> None:
    def op(kind: OperationKind, audience: int | None = None) -> Operation:
        return Operation(kind, {}, "k", audience, "m")

    assert not units.should_split([])
    assert not units.should_split([op(OperationKind.MEMBERS, 1)])
    assert not units.should_split([op(OperationKind.AUDIENCE_UPSERT, 1)])
    assert units.should_split([op(OperationKind.MEMBERS, 1), op(OperationKind.MEMBERS, 2)])
    # Event batches are grouped, never split.
    assert not units.should_split([op(OperationKind.EVENTS), op(OperationKind.EVENTS)])


# ---------------------------------------------------------------- the split step


def test_the_split_stores_one_unit_per_operation_and_calls_nobody(
    rt: Runtime, partner: ScriptedPartnerClient, caplog: pytest.LogCaptureFixture
) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="u-secret-1")
    first_seen = _now_ms() - 5000
    with caplog.at_level(logging.INFO, logger="workers.tasks"):
        assert _split(rt, msg, first_seen) is None
    assert not partner.calls
    ops = plan_message(msg).operations
    inbox = take_inbox(rt)
    assert len(inbox) == len(ops) == 3
    for (_, fields), op in zip(inbox, ops, strict=True):
        assert fields[b"type"] == UNIT.encode() and fields[b"attempt"] == b"1"
        assert fields[b"first_seen"] == str(first_seen).encode()
        assert fields[b"id"] == units.unit_id(op).encode() and fields[b"lane"] == partner_key("u-secret-1").encode()
        unit = units.decode(orjson.loads(fields[b"body"]))
        assert unit.operation == op and unit.message_id == msg["id"]
    assert len({fields[b"id"] for _, fields in inbox}) == 3
    assert (_counter(rt, units.SPLIT_COUNTER), _counter(rt, units.UNITS_COUNTER)) == (1, 3)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "message_split"]
    assert (record.message_id, record.account_id, record.units) == (msg["id"], msg["account"]["account_id"], 3)
    assert "u-secret-1" not in caplog.text
    # The pump hands a unit to `firehose.deliver` as a single message, under the unit's own task id.
    [job] = plan_jobs([inbox[0]], max_messages=50, max_events=1000)
    # A unit without its `lane` field (retried, replayed) still waits in its API key's lane.
    assert lane_of({b"body": inbox[0][1][b"body"]}) == lane_of(inbox[0][1]) == partner_key("u-secret-1")
    assert (job.task, job.attempt, job.first_seen_ms, job.task_id) == ("single", 1, first_seen, units.unit_id(ops[0]))


def test_only_operations_not_yet_delivered_become_units(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="u2")
    ops = plan_message(msg).operations
    rt.redis.set(rt.keys.delivered(ops[1].idempotency_key()), 1)
    assert _split(rt, msg) is None
    written = [units.decode(orjson.loads(fields[b"body"])).operation for _, fields in take_inbox(rt)]
    assert written == [ops[0], ops[2]] and not partner.calls


def test_one_operation_left_is_sent_in_place(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="u3")
    ops = plan_message(msg).operations
    for op in ops[:2]:
        rt.redis.set(rt.keys.delivered(op.idempotency_key()), 1)
    assert _split(rt, msg) == Decision(Action.DELIVERED, 1)
    assert partner.keys == [ops[2].idempotency_key()] and not take_inbox(rt)
    # A subscription is one operation: never split either.
    sub = message(SUBSCRIPTION_MESSAGE, api_key="u3")
    assert _split(rt, sub) == Decision(Action.DELIVERED, 1) and not take_inbox(rt)


def test_the_split_mark_makes_a_rerun_write_nothing(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="u4")
    assert _split(rt, msg) is None
    # The task died before its ack: it runs again.
    assert _split(rt, msg) is None
    assert len(take_inbox(rt)) == 3 and not partner.calls
    assert (_counter(rt, units.SPLIT_COUNTER), _counter(rt, units.UNITS_COUNTER)) == (1, 3)
    [mark] = rt.redis.keys(rt.keys.split(msg["id"]) + ":*")  # one chunk, one mark
    assert 0 < rt.redis.ttl(mark) <= rt.settings.dedup_ttl_seconds


def test_a_big_split_is_written_in_chunks_and_a_rerun_writes_only_what_is_missing(
    rt: Runtime, partner: ScriptedPartnerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(units, "UNITS_PER_STEP", 2)
    msg = message(MEMBERSHIP_MESSAGE, api_key="u9")
    assert _split(rt, msg) is None
    marks = rt.redis.keys(rt.keys.split(msg["id"]) + ":*")
    assert len(marks) == 2  # 3 units: a chunk of 2, a chunk of 1
    rt.redis.delete(marks[0])  # as if the task had died between the two steps
    assert _split(rt, msg) is None
    ids = [fields[b"id"] for _, fields in take_inbox(rt)]
    assert len(set(ids)) == 3 and len(ids) in (4, 5)  # the missing chunk again; nothing lost
    assert not partner.calls


# ---------------------------------------------------------------- units on their way


def test_each_unit_is_one_call_under_the_operations_idempotency_key(
    rt: Runtime, partner: ScriptedPartnerClient
) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="u5")
    _split(rt, msg)
    assert [decision for _, decision in run_inbox(rt)] == [Decision(Action.DELIVERED, 1)] * 3
    assert partner.keys == _keys(msg)
    assert [op for op, _ in partner.calls] == plan_message(msg).operations
    # A unit run again (published twice by the pump) makes no second call.
    unit_body = units.encode(plan_message(msg).operations[0], account_id=1, message_type=MEMBERSHIP_MESSAGE)
    assert len(attempt_delivery([unit_body], rt).delivered) == 1 and len(partner.calls) == 3


def test_a_units_transient_failure_retries_only_that_unit(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="u6")
    ops = plan_message(msg).operations
    first_seen = _now_ms() - 2000
    _split(rt, msg, first_seen)
    partner.answers = [503]
    decisions = [decision for _, decision in run_inbox(rt)]
    assert [(d.action, d.attempt) for d in decisions if d] == [
        (Action.RETRY, 2),
        (Action.DELIVERED, 1),
        (Action.DELIVERED, 1),
    ]
    [raw] = rt.redis.zrange(rt.keys.retry_schedule, 0, -1)
    entry = orjson.loads(raw)
    assert (entry["type"], entry["id"], entry["attempt"], entry["first_seen"]) == (
        UNIT,
        units.unit_id(ops[0]),
        2,
        first_seen,
    )
    # Due: back through the inbox, the same call under the same key.
    rt.redis.zadd(rt.keys.retry_schedule, {raw: 0}, xx=True)
    assert rt.retries.move_due(10) == 1
    assert [decision for _, decision in run_inbox(rt)] == [Decision(Action.DELIVERED, 2)]
    assert partner.keys == [
        ops[0].idempotency_key(),
        ops[1].idempotency_key(),
        ops[2].idempotency_key(),
        ops[0].idempotency_key(),
    ]


def test_a_units_permanent_failure_dead_letters_only_that_unit(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = message(MEMBERSHIP_MESSAGE, api_key="u7")
    ops = plan_message(msg).operations
    _split(rt, msg)
    partner.answers = [200, 400]
    decisions = [decision for _, decision in run_inbox(rt)]
    assert decisions[1] == Decision(Action.DEAD, 1, reason=DeadReason.PARTNER_REJECTED)
    assert decisions[0] == decisions[2] == Decision(Action.DELIVERED, 1)
    [letter] = dead_letters.list_letters(rt.redis, rt.keys)
    assert letter.id == units.unit_id(ops[1]) and letter.message_id == msg["id"]
    assert (letter.account_id, letter.type, letter.last_status) == (msg["account"]["account_id"], msg["type"], 400)
    # `flask dlq show` prints the redacted body: the API key is not in it.
    assert "u7" not in orjson.dumps(letter.redacted_message()).decode() and "u7" in letter.body
    # Replayed (`flask dlq replay`), it is delivered as the unit: one call, the same key.
    assert dead_letters.replay(rt.redis, rt.keys, letter.id)
    partner.calls.clear()
    assert [decision for _, decision in run_inbox(rt)] == [Decision(Action.DELIVERED, 1)]
    assert partner.keys == [ops[1].idempotency_key()]


def test_750_audiences_become_750_units_without_a_partner_call(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    msg = _wide_membership(750, "u8")
    assert _split(rt, msg) is None
    assert not partner.calls
    inbox = take_inbox(rt)
    assert len(inbox) == 750
    keys = [units.decode(orjson.loads(fields[b"body"])).operation.idempotency_key() for _, fields in inbox]
    assert keys == _keys(msg) and len(set(keys)) == 750
    assert len({fields[b"id"] for _, fields in inbox}) == 750
