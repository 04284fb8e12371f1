"""Celery tasks: they apply what workers.delivery decides (reschedule, dead-letter, count, log).

What Celery sees of a task tells the truth and no secret. Its arguments are message bodies
(apiKeys, emails, device ids): the pump publishes each task with a summary as `argsrepr`
(workers/pump.py `args_summary`), which is all Celery's events carry, and `SafeRequest` makes
`celery inspect` (and Flower's worker pages) show that summary too. Its end state is what became
of the work: SUCCESS only when the partner has all of it; RETRY (a `Retry` raised after the work
is in the retry schedule, with the reason and due time, acknowledged and never re-published by
Celery) when it waits there; FAILURE (`DeadLettered`) when any of it went to the dead letters.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis
from celery import current_task, shared_task
from celery.exceptions import Reject, Retry
from celery.worker.request import Request

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
from workers.pump import task_ended
from workers.runtime import Runtime, runtime

log = logging.getLogger(__name__)

# Between a Redis error and the requeue: not a hot loop while Redis comes back.
REDIS_ERROR_PAUSE_SECONDS = 1.0


class SafeRequest(Request):
    """A task request whose `info()` is always the safe form: the pump's summary, never bodies.

    `celery inspect active/reserved/scheduled/query_task`, and Flower's worker pages, which ask
    the same, show `info()`; by default it holds the raw arguments.
    """

    def info(self, safe: bool = False) -> dict[str, Any]:
        return super().info(safe=True)


class Rescheduled(Exception):
    """What Celery's task-retried event shows: the work waits in our retry schedule, and why."""


class DeadLettered(Exception):
    """What Celery's task-failed event shows: (some of) the work went to the dead letters, and why."""


@dataclass
class AttemptReport:
    """What one task did, for Celery's view of it (ids, counts and reasons only, never a body)."""

    decision: Decision | None = None
    delivered: int = 0
    pending: int = 0
    dead: Counter[str] = field(default_factory=Counter)  # reason -> messages dead-lettered
    split: int | None = None  # units written when the message was split
    last_status: int | None = None


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
        retention_seconds=rt.settings.dlq_retention_seconds,
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
    bodies: list[str],
    attempt: int,
    first_seen_ms: int | None,
    *,
    grouped: bool,
    rt: Runtime,
    report: AttemptReport | None = None,
) -> Decision | None:
    """Attempt `attempt` at these messages, and apply what `decide` makes of it.

    `grouped`: the work is a group of event batches (it is rescheduled as one group entry).
    A single message with more than one partner operation left is split into units instead
    (workers/units.py): this attempt stores them and makes no partner call.
    Returns the decision; None when every message was rejected before any call, or when the
    message was split. `report`, when given, is filled in with what became of the work.
    """
    report = report if report is not None else AttemptReport()
    now_ms = _now_ms()
    first_seen = first_seen_ms or now_ms
    members, rejected = plan(bodies, rt)
    if not grouped and len(members) == 1 and units.should_split(members[0].operations):
        report.split = _split(rt, members[0], first_seen)
        return None
    result = deliver_planned(members, rejected, rt)
    for rejected in result.rejected:
        # A group's invalid member is dead-lettered on its own, with its own id and reason.
        _log_attempt(
            rejected.message_id, rejected.account_id, attempt, Decision(Action.DEAD, attempt, None, rejected.reason)
        )
        _dead_letter(rt, rejected, rejected.reason, attempt, error=rejected.error)
        report.dead[str(rejected.reason)] += 1
    report.delivered = len(result.delivered)
    if result.delivered:
        # The lag ends at the partner's 2xx, i.e. now, not when this attempt started.
        stats.record_delivered(rt.redis, rt.keys, [m.message_type for m in result.delivered], first_seen, _now_ms())
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
        report.dead[str(decision.reason or "unknown")] += len(result.pending)
    else:
        report.pending = len(result.pending)
    report.decision, report.last_status = decision, outcome.last_status
    return decision


def _split(rt: Runtime, member: Member, first_seen_ms: int) -> int:
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
    return written or 0


def _give_back_slot(bodies: list[str], task_id: str | None, work_moved_on: bool = True) -> None:
    """The task's slot in its lane (workers/pump.py), so the pump publishes the lane's next work,
    and, once its work has moved on, the copy the pump kept of it.

    Best effort: a slot not given back lapses on its own, and a copy not dropped only puts the
    job back into its lane after BROKER_VISIBILITY_TIMEOUT, where its marks make it a no-op.
    """
    if not task_id or not bodies:
        return
    lane = lane_of({b"body": bodies[0].encode()})
    try:
        rt = runtime()
        task_ended(rt.redis, rt.keys, lane, task_id, work_moved_on)
    except redis.RedisError:
        log.warning("slot_not_given_back", extra={"event": "slot_not_given_back"})


def _current_task_id() -> str | None:
    request = current_task.request if current_task else None
    return getattr(request, "id", None)


def _run_by_worker() -> bool:
    """Whether a worker runs this task (and reads its end state), rather than a direct call."""
    request = current_task.request if current_task else None
    return request is not None and not getattr(request, "called_directly", True)


def _due(delay: float | None) -> tuple[datetime, str]:
    due = datetime.now(UTC) + timedelta(seconds=delay or 0.0)
    return due, due.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _tell_celery(report: AttemptReport) -> str:
    """End the task in the state that says what became of its work; returns the success summary.

    Raised only once the work is where it will stay (the retry schedule, the dead letters):
    under acks_late both a Retry and a failure acknowledge the message, and a Retry raised here
    (not `Task.retry()`) publishes nothing, so Celery neither loses nor repeats work our retry
    schedule holds. Every text is ids, counts, reasons and statuses: never a body or a partner's
    answer text, which could echo a key.
    """
    decision = report.decision
    status = "" if report.last_status is None else f", last status {report.last_status}"
    parts = []
    if report.delivered:
        parts.append(f"delivered {report.delivered}")
    if report.split is not None:
        parts.append(f"split into {report.split} units")
    rescheduled = ""
    if decision is not None and decision.action in (Action.RETRY, Action.DEFER):
        _, due_text = _due(decision.delay)
        what = "retry" if decision.action is Action.RETRY else "deferred"
        rescheduled = (
            f"{what} ({decision.reason}{status}): {report.pending} to attempt {decision.attempt},"
            f" due {due_text} (in {decision.delay or 0.0:.3f} s)"
        )
        parts.append(rescheduled)
    if report.dead:
        reasons = ", ".join(f"{reason} x{count}" for reason, count in sorted(report.dead.items()))
        dead_status = status if decision is not None and decision.action is Action.DEAD else ""
        parts.insert(0, f"dead-lettered ({reasons}{dead_status})")
    summary = "; ".join(parts) or "nothing to deliver"
    if not _run_by_worker():
        return summary
    if report.dead:
        raise DeadLettered(summary)
    if rescheduled and decision is not None:
        due, _ = _due(decision.delay)
        raise Retry(summary, Rescheduled(summary), when=due)
    return summary


def _never_lost(bodies_of: Callable[..., list[str]]) -> Callable[[Callable[..., AttemptReport]], Callable[..., str]]:
    """Whatever goes wrong inside a task, its message is neither acknowledged nor dropped.

    A Redis error (a restart, a failover) puts the message back on the queue. Any other
    exception is a fault of ours: the message goes to the dead letters with the exception's
    type, to be replayed once fixed, rather than looping forever or vanishing as a failed task.
    Then the task ends in the state that tells what became of its work (`_tell_celery`).
    """

    def wrap(task: Callable[..., AttemptReport]) -> Callable[..., str]:
        @functools.wraps(task)
        def run(*args: Any, **kwargs: Any) -> str:
            # False while the work goes back to the broker: the pump's copy must stay until it ends.
            moved_on = True
            try:
                report = task(*args, **kwargs)
            except redis.RedisError as exc:
                log.warning("task_redis_error %s", type(exc).__name__, extra={"event": "task_redis_error"})
                time.sleep(REDIS_ERROR_PAUSE_SECONDS)
                moved_on = False
                raise Reject(f"Redis error: {type(exc).__name__}", requeue=True) from None
            except Exception as exc:
                log.exception("task_failed", extra={"event": "task_failed", "error": type(exc).__name__})
                rt = runtime()
                attempt = kwargs.get("attempt", 1)
                report = AttemptReport()
                try:
                    for body in bodies_of(*args, **kwargs):
                        member = Rejected(body, *_identify(body), DeadReason.INTERNAL_ERROR)
                        _dead_letter(rt, member, member.reason, attempt, error=type(exc).__name__)
                        report.dead[f"{DeadReason.INTERNAL_ERROR}: {type(exc).__name__}"] += 1
                except redis.RedisError:
                    moved_on = False
                    raise Reject("could not dead-letter", requeue=True) from None
            finally:
                _give_back_slot(bodies_of(*args, **kwargs), _current_task_id(), moved_on)
            return _tell_celery(report)

        return run

    return wrap


# Request: what `celery inspect` shows of a task is the pump's summary. throws: a dead-lettered
# task's failure is the relay's decision, logged by Celery as expected (one line, no traceback).
_TASK_OPTIONS: dict[str, Any] = {
    "ignore_result": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "Request": SafeRequest,
    "throws": (DeadLettered,),
}


@shared_task(name=DELIVER_TASK, **_TASK_OPTIONS)
@_never_lost(lambda body, *_, **__: [body])
def deliver(body: str, attempt: int = 1, first_seen_ms: int | None = None) -> AttemptReport:
    """Attempt `attempt` to deliver one accepted message.

    Waits never happen here: a retry or a rate-limited message goes to the retry schedule
    (workers/scheduler.py) and this task ends, so no worker is parked and no countdown can
    outlive the broker's visibility timeout.
    """
    report = AttemptReport()
    run_attempt([body], attempt, first_seen_ms, grouped=False, rt=runtime(), report=report)
    return report


@shared_task(name=DELIVER_EVENTS_TASK, **_TASK_OPTIONS)
@_never_lost(lambda bodies, *_, **__: list(bodies))
def deliver_events(bodies: list[str], attempt: int = 1, first_seen_ms: int | None = None) -> AttemptReport:
    """Attempt `attempt` to deliver a group of event batches for one API key in one partner call."""
    report = AttemptReport()
    run_attempt(list(bodies), attempt, first_seen_ms, grouped=True, rt=runtime(), report=report)
    return report
