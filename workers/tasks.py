"""Celery tasks: they apply what workers.delivery decides (reschedule, dead-letter, count, log)."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
from celery import current_task, shared_task
from celery.exceptions import Reject

from common import dead_letters, stats
from common.names import DELIVER_EVENTS_TASK, DELIVER_TASK
from workers import units
from workers.delivery import (
    Action,
    DeadReason,
    Decision,
    Member,
    Outcome,
    Rejected,
    decide,
    deliver_planned,
    identify_body,
    plan,
)
from workers.grouping import GROUP, UNIT, lane_of
from workers.runtime import Runtime, runtime

log = logging.getLogger(__name__)

# Between a Redis error and the requeue: not a hot loop while Redis comes back.
REDIS_ERROR_PAUSE_SECONDS = 1.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _log_attempt(
    message_id: str | None,
    account_id: int | None,
    attempt: int,
    decision: Decision,
    outcome: Outcome | None = None,
) -> None:
    status = outcome.last_status if outcome else None
    wait = decision.delay
    log.info(
        "delivery_attempt message_id=%s account_id=%s attempt=%s outcome=%s status=%s wait=%s",
        message_id,
        account_id,
        attempt,
        decision.action.value,
        status,
        None if wait is None else round(wait, 3),
        extra={
            "event": "delivery_attempt",
            "message_id": message_id,
            "account_id": account_id,
            "attempt": attempt,
            "outcome": decision.action.value,
            "reason": None if decision.reason is None else str(decision.reason),
            "status": status,
            "wait": wait,
        },
    )


def _dead_letter(
    rt: Runtime,
    member: Member | Rejected,
    reason: str,
    attempt: int,
    last_status: int | None = None,
    error: str | None = None,
) -> None:
    dead_letters.add(
        rt.redis,
        rt.keys,
        member.body,
        reason=str(reason),
        message_id=member.message_id,
        account_id=member.account_id,
        message_type=member.message_type,
        last_status=last_status,
        error=error,
        attempts=attempt,
        letter_id=_unit_id(member),
    )


def _unit_id(member: Member | Rejected) -> str | None:
    """A unit's own id: its siblings share the message id, a dead letter and a task id must not."""
    if not units.is_unit_body(member.body):
        return None
    if isinstance(member, Member) and member.operations:
        return units.unit_id(member.operations[0])
    try:
        return units.unit_id(units.decode(orjson.loads(member.body)).operation)
    except (orjson.JSONDecodeError, units.UnitInvalid):
        return None


def _identify(body: str) -> tuple[str | None, int | None, str | None]:
    """(message id, account id, type) of a message, or of the message a unit came from."""
    if units.is_unit_body(body):
        try:
            return units.identify(orjson.loads(body))
        except orjson.JSONDecodeError:
            pass
    return identify_body(body)


def _reschedule(
    rt: Runtime, pending: tuple[Member, ...], grouped: bool, decision: Decision, first_seen_ms: int
) -> None:
    if grouped:
        # A group goes back as the same group: regrouped, the partner could get a batch it
        # already took (behind a timeout) again under another Idempotency-Key.
        members = orjson.dumps([member.body for member in pending]).decode()
        body, message_id, message_type = members, hashlib.sha256(members.encode()).hexdigest()[:32], GROUP
    else:
        [member] = pending
        body, message_id, message_type = member.body, member.message_id or "", member.message_type or ""
        unit_id = _unit_id(member)
        if unit_id is not None:
            # A unit goes back as itself, under its own id: never as the message it came from.
            message_id, message_type = unit_id, UNIT
    rt.retries.schedule(
        body,
        message_id=message_id,
        message_type=message_type,
        attempt=decision.attempt,
        first_seen_ms=first_seen_ms,
        delay=decision.delay or 0.0,
        # Straight back into its own lane when due, never behind other keys' backlog.
        lane=lane_of({b"body": body.encode(), b"type": message_type.encode()}),
    )


def run_attempt(
    bodies: list[str], attempt: int, first_seen_ms: int | None, *, grouped: bool, rt: Runtime
) -> Decision | None:
    """Attempt `attempt` at these messages, and apply what `decide` makes of it.

    `grouped`: the work is a group of event batches (it is rescheduled as one group entry).
    A single message with more than one partner operation left is split into units instead
    (workers/units.py): this attempt stores them and makes no partner call.
    Returns the decision; None when every message was rejected before any call, or when the
    message was split.
    """
    now_ms = _now_ms()
    first_seen = first_seen_ms or now_ms
    members, rejected = plan(bodies, rt)
    if not grouped and len(members) == 1 and units.should_split(members[0].operations):
        _split(rt, members[0], first_seen)
        return None
    result = deliver_planned(members, rejected, rt)
    for rejected in result.rejected:
        # A group's invalid member is dead-lettered on its own, with its own id and reason.
        _log_attempt(
            rejected.message_id, rejected.account_id, attempt, Decision(Action.DEAD, attempt, None, rejected.reason)
        )
        _dead_letter(rt, rejected, rejected.reason, attempt, error=rejected.error)
    if result.delivered:
        stats.incr(rt.redis, rt.keys, stats.DELIVERED, len(result.delivered))
    if not result.delivered and not result.pending:
        return None
    outcome = result.outcome
    decision = decide(outcome, attempt=attempt, first_seen_ms=first_seen, now_ms=now_ms, settings=rt.settings)
    if decision.action in (Action.RETRY, Action.DEFER):
        _reschedule(rt, result.pending, grouped, decision, first_seen)
        if decision.action is Action.RETRY:
            stats.incr(rt.redis, rt.keys, stats.RETRIED)
    _log_attempt(result.message_id, result.account_id, attempt, decision, outcome)
    if decision.action is Action.DEAD:
        for member in result.pending:
            _dead_letter(rt, member, decision.reason or "unknown", attempt, outcome.last_status, outcome.error)
    return decision


def _split(rt: Runtime, member: Member, first_seen_ms: int) -> None:
    """Store each operation still to deliver as a unit in its lane, chunk by atomic chunk.

    If this task dies after a step and before its ack, its re-run finds the chunks' split marks
    and writes only what it had not. Were the mark gone (its TTL is the dedupe window), the twins written again
    would still be harmless: each carries the same idempotency key, so the delivered marks,
    the audience guard and the partner's Idempotency-Key drop the second of each.
    """
    written = units.store_units(
        rt.redis,
        rt.keys,
        units.split_mark_id(member.message_id, member.body),
        units.entries(member.operations, account_id=member.account_id, message_type=member.message_type),
        first_seen_ms=first_seen_ms,
        mark_ttl=rt.settings.dedup_ttl_seconds,
    )
    log.info(
        "message_split message_id=%s account_id=%s units=%s",
        member.message_id,
        member.account_id,
        written or 0,
        extra={
            "event": "message_split",
            "message_id": member.message_id,
            "account_id": member.account_id,
            "units": written or 0,
            "already_split": written is None,
        },
    )


def _give_back_slot(bodies: list[str], task_id: str | None) -> None:
    """The task's slot in its lane (workers/pump.py), so the pump publishes the lane's next work.

    Best effort: a slot not given back lapses on its own, and the pump waits for nothing else.
    """
    if not task_id or not bodies:
        return
    lane = lane_of({b"body": bodies[0].encode()})
    try:
        rt = runtime()
        rt.redis.zrem(rt.keys.lane_slots(lane), task_id)
    except redis.RedisError:
        log.warning("slot_not_given_back", extra={"event": "slot_not_given_back"})


def _current_task_id() -> str | None:
    request = current_task.request if current_task else None
    return getattr(request, "id", None)


def _never_lost(bodies_of: Callable[..., list[str]]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Whatever goes wrong inside a task, its message is neither acknowledged nor dropped.

    A Redis error (a restart, a failover) puts the message back on the queue. Any other
    exception is a fault of ours: the message goes to the dead letters with the exception's
    type, to be replayed once fixed, rather than looping forever or vanishing as a failed task.
    """

    def wrap(task: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(task)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                task(*args, **kwargs)
            except redis.RedisError as exc:
                log.warning("task_redis_error %s", type(exc).__name__, extra={"event": "task_redis_error"})
                time.sleep(REDIS_ERROR_PAUSE_SECONDS)
                raise Reject(f"Redis error: {type(exc).__name__}", requeue=True) from None
            except Exception as exc:
                log.exception("task_failed", extra={"event": "task_failed", "error": type(exc).__name__})
                rt = runtime()
                attempt = kwargs.get("attempt", 1)
                try:
                    for body in bodies_of(*args, **kwargs):
                        member = Rejected(body, *_identify(body), DeadReason.INTERNAL_ERROR)
                        _dead_letter(rt, member, member.reason, attempt, error=type(exc).__name__)
                except redis.RedisError:
                    raise Reject("could not dead-letter", requeue=True) from None
            finally:
                _give_back_slot(bodies_of(*args, **kwargs), _current_task_id())

        return run

    return wrap


@shared_task(name=DELIVER_TASK, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
@_never_lost(lambda body, *_, **__: [body])
def deliver(body: str, attempt: int = 1, first_seen_ms: int | None = None) -> None:
    """Attempt `attempt` to deliver one accepted message.

    Waits never happen here: a retry or a rate-limited message goes to the retry schedule
    (workers/scheduler.py) and this task ends, so no worker is parked and no countdown can
    outlive the broker's visibility timeout.
    """
    run_attempt([body], attempt, first_seen_ms, grouped=False, rt=runtime())


@shared_task(name=DELIVER_EVENTS_TASK, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
@_never_lost(lambda bodies, *_, **__: list(bodies))
def deliver_events(bodies: list[str], attempt: int = 1, first_seen_ms: int | None = None) -> None:
    """Attempt `attempt` to deliver a group of event batches for one API key in one partner call."""
    run_attempt(list(bodies), attempt, first_seen_ms, grouped=True, rt=runtime())
