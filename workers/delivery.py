"""Delivering one accepted message: plan its partner operations and send those not yet sent.

A plain function of the message and the runtime; the Celery task around it adds only the
retry policy and logging.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from common import stats
from schemas.fields import MessageInvalid
from workers.mapping import PermanentFailure, Plan, plan_message
from workers.partner.base import AUDIENCE_DELETE, AUDIENCE_UPSERT, EVENTS, MEMBERS, Operation, PartnerResult
from workers.runtime import Runtime

log = logging.getLogger(__name__)

# Bounds the turns one task spends waiting for the rate limit before it hands the message
# to the retry schedule instead.
_MAX_INLINE_WAITS = 5
# Waiting for another task's member call to the same audience: about a second in all.
_LOCK_TRIES = 20
_LOCK_POLL_SECONDS = 0.05
AUDIENCE_KINDS = frozenset({MEMBERS, AUDIENCE_UPSERT, AUDIENCE_DELETE})
# A suspension flag outlives any fix the customer would make; a fix clears it sooner.
SUSPEND_TTL_SECONDS = 30 * 86400


@dataclass
class Outcome:
    # "delivered"; "retry" (transient failure); "deferred" (rate limited or paused: try again
    # later without counting an attempt); "dead" (never deliverable as it is)
    status: str
    message_id: str | None = None
    account_id: int | None = None
    message_type: str | None = None
    reason: str | None = None
    last_status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    operations: int = 0
    sent: int = 0
    waited: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)


def _count_skipped(rt: Runtime, skipped: dict[str, int]) -> None:
    if skipped:
        pipe = rt.redis.pipeline(transaction=False)
        for reason, n in skipped.items():
            pipe.hincrby(rt.keys.skipped_events, reason, n)
        pipe.execute()


def _wait_for_slot(rt: Runtime, operation: Operation, outcome: Outcome) -> float:
    """0 once this call holds a rate-limit slot; else how long the task should be deferred."""
    partner_key = operation.partner_key()
    for _ in range(_MAX_INLINE_WAITS):
        wait = rt.gate.acquire(partner_key)
        if wait <= 0:
            return 0.0
        stats.incr(rt.redis, rt.keys, stats.RATE_LIMITED)
        if wait > rt.settings.rate_limit_max_inline_wait_seconds:
            return wait
        outcome.waited += wait
        time.sleep(wait)
    return rt.settings.rate_limit_max_inline_wait_seconds


def _send(rt: Runtime, operation: Operation, key: str) -> PartnerResult:
    started = time.monotonic()
    result = rt.partner.send(operation, key)
    pipe = rt.redis.pipeline(transaction=False)
    stats.incr(pipe, rt.keys, stats.PARTNER_CALLS)
    stats.record_latency(pipe, rt.keys, time.monotonic() - started)
    if result.status == 429:
        # A 429 speaks for the whole API key: pause every worker's calls to it, not just this task.
        pause = min(result.retry_after or 1.0, rt.settings.retry_after_max_seconds)
        rt.gate.pause(operation.partner_key(), pause)
    pipe.execute()
    return result


def deliver_message(body: str | bytes, rt: Runtime) -> Outcome:
    plan = _plan_single(body, rt)
    if isinstance(plan, Outcome):
        return plan
    outcome = Outcome(
        "delivered",
        message_id=plan.message_id,
        account_id=plan.account_id,
        message_type=plan.message_type,
        operations=len(plan.operations),
        skipped=plan.skipped,
    )
    for operation in plan.operations:
        marker = rt.keys.delivered(operation.idempotency_key())
        # The partner already took this payload (an earlier attempt, a replay, or a pump
        # that published the message twice): never send it again.
        if rt.redis.exists(marker):
            continue
        if operation.kind == MEMBERS:
            done = _deliver_members(rt, operation, outcome)
        else:
            done = _deliver(rt, operation, outcome)
        if not done:
            return outcome
        rt.redis.set(marker, 1, ex=rt.settings.dedup_ttl_seconds)
    return outcome


def _deliver(rt: Runtime, operation: Operation, outcome: Outcome) -> bool:
    """Send one operation under the partner gate; True once the partner took it."""
    defer = _wait_for_slot(rt, operation, outcome)
    if defer:
        outcome.status, outcome.reason, outcome.retry_after = "deferred", "rate_limited", defer
        return False
    result = _send(rt, operation, operation.idempotency_key())
    outcome.last_status = result.status
    if operation.kind in AUDIENCE_KINDS and outcome.account_id is not None:
        _track_credentials(rt, operation, outcome.account_id, result.status)
    if result.outcome == "ok":
        outcome.sent += 1
        return True
    outcome.error = result.error
    outcome.retry_after = result.retry_after
    outcome.status = "retry" if result.outcome == "transient" else "dead"
    outcome.reason = "partner_transient" if outcome.status == "retry" else "partner_rejected"
    return False


def _deliver_members(rt: Runtime, operation: Operation, outcome: Outcome) -> bool:
    """Member changes go one call per audience at a time, and only forward in time."""
    for _ in range(_LOCK_TRIES):
        with rt.audiences.locked(operation) as held:
            if held:
                fresh = rt.audiences.fresh_changes(operation)
                if fresh is None:
                    return True  # the partner already has newer state for every user here
                if not _deliver(rt, fresh, outcome):
                    return False
                rt.audiences.record(fresh)
                return True
        time.sleep(_LOCK_POLL_SECONDS)
    outcome.status, outcome.reason, outcome.retry_after = "deferred", "audience_busy", 1.0
    return False


def _track_credentials(rt: Runtime, operation: Operation, account_id: int, status: int | None) -> None:
    """A 401/403 on audience calls asks mParticle to suspend the subscription; a success clears it."""
    flag = rt.keys.suspended(account_id)
    if status in (401, 403):
        rt.redis.set(flag, operation.partner_key(), ex=SUSPEND_TTL_SECONDS)
    elif status is not None and 200 <= status < 300:
        rt.redis.delete(flag)


@dataclass
class GroupOutcome:
    """What became of a group of event batches sent as one partner call."""

    outcome: Outcome  # the shared call: delivered, retry, deferred or dead
    delivered: int = 0  # messages the partner has now (or had already)
    # (body, its operation) still to deliver after a retry or a deferral
    pending: list[tuple[str, Operation]] = field(default_factory=list)
    dead: list[tuple[str, Outcome]] = field(default_factory=list)  # (body, why) to dead-letter


def deliver_event_group(bodies: list[str], rt: Runtime) -> GroupOutcome:
    """Send many messages' event batches for one API key in one `POST /v1/events`.

    The merged payload (and so its Idempotency-Key) depends only on the group's members; a
    group that fails is retried as the same group (see workers/grouping.py).
    """
    group = GroupOutcome(Outcome("delivered", message_type="event_processing_request"))
    members: list[tuple[str, Operation]] = []
    for body in bodies:
        single = _plan_single(body, rt)
        if isinstance(single, Outcome):
            group.dead.append((body, single))
            continue
        if not single.operations:
            group.delivered += 1  # every event was skipped: nothing to send
            continue
        [operation] = single.operations
        if rt.redis.exists(rt.keys.delivered(operation.idempotency_key())):
            group.delivered += 1
            continue
        members.append((body, operation))
    if not members:
        return group
    merged = Operation(
        EVENTS,
        {"batches": [batch for _, op in members for batch in op.payload["batches"]]},
        members[0][1].api_key,
        message_id=",".join(op.message_id or "" for _, op in members),
    )
    outcome = group.outcome
    outcome.message_id = members[0][1].message_id if len(members) == 1 else f"group of {len(members)}"
    outcome.account_id = members[0][1].payload["batches"][0]["account_id"]
    outcome.operations = 1
    if not _deliver(rt, merged, outcome):
        if outcome.status == "dead":
            group.dead.extend((body, member_outcome(outcome, op)) for body, op in members)
        else:
            group.pending = members
        return group
    pipe = rt.redis.pipeline(transaction=False)
    for _, operation in members:
        pipe.set(rt.keys.delivered(operation.idempotency_key()), 1, ex=rt.settings.dedup_ttl_seconds)
    pipe.execute()
    group.delivered += len(members)
    return group


def member_outcome(shared: Outcome, operation: Operation) -> Outcome:
    """A group's outcome, told of one of its messages (for its log line and dead letter)."""
    batch = operation.payload["batches"][0]
    return dataclasses.replace(shared, message_id=batch["message_id"], account_id=batch["account_id"])


def _plan_single(body: str | bytes, rt: Runtime) -> Plan | Outcome:
    """The plan of one message (skipped events counted), or the Outcome that dead-letters it."""
    try:
        message: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Outcome("dead", reason="invalid_json")
    try:
        plan = plan_message(message)
    except (MessageInvalid, PermanentFailure) as exc:
        invalid = isinstance(exc, MessageInvalid)
        return Outcome(
            "dead",
            message_id=message_id_of(message),
            account_id=account_id_of(message),
            message_type=message.get("type") if isinstance(message, dict) else None,
            reason="invalid_message" if invalid else exc.reason,
            error=str(exc)[:500] if invalid else exc.detail,
        )
    _count_skipped(rt, plan.skipped)
    return plan


def message_id_of(message: Any) -> str | None:
    if isinstance(message, dict) and isinstance(message.get("id"), str):
        return message["id"][:64]
    return None


def account_id_of(message: Any) -> int | None:
    account = message.get("account") if isinstance(message, dict) else None
    account_id = account.get("account_id") if isinstance(account, dict) else None
    return account_id if isinstance(account_id, int) and not isinstance(account_id, bool) else None
