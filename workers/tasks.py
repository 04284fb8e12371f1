"""Celery tasks: thin wrappers that add the retry policy and logging to workers.delivery."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
from celery import shared_task
from celery.exceptions import Reject

from common import stats
from workers import dead_letters
from workers.celery_app import DELIVER_EVENTS_TASK, DELIVER_TASK
from workers.delivery import Outcome, account_id_of, deliver_event_group, deliver_message, member_outcome, message_id_of
from workers.grouping import GROUP
from workers.runtime import Runtime, runtime

log = logging.getLogger(__name__)


def backoff_seconds(attempt: int, rt: Runtime, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, never less than the partner's Retry-After.

    Attempt n waits a random time in [0, min(RETRY_BACKOFF_MAX, BASE * 2^(n-1))]; a
    Retry-After raises that to its value, capped by RETRY_AFTER_MAX_SECONDS.
    """
    settings = rt.settings
    delay = random.uniform(0, min(settings.retry_backoff_max, settings.retry_backoff_base * 2 ** (attempt - 1)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.retry_after_max_seconds))
    return delay


def _log_attempt(outcome: Outcome, attempt: int, wait: float | None) -> None:
    log.info(
        "delivery_attempt message_id=%s account_id=%s attempt=%s outcome=%s status=%s wait=%s",
        outcome.message_id,
        outcome.account_id,
        attempt,
        outcome.status,
        outcome.last_status,
        None if wait is None else round(wait, 3),
        extra={
            "event": "delivery_attempt",
            "message_id": outcome.message_id,
            "account_id": outcome.account_id,
            "attempt": attempt,
            "outcome": outcome.status,
            "reason": outcome.reason,
            "status": outcome.last_status,
            "wait": wait,
            "rate_limit_wait": round(outcome.waited, 3),
        },
    )


def _dead(rt: Runtime, body: str, outcome: Outcome, reason: str, attempt: int) -> None:
    dead_letters.add(
        rt.redis,
        rt.keys,
        body,
        reason=reason,
        message_id=outcome.message_id,
        account_id=outcome.account_id,
        message_type=outcome.message_type,
        last_status=outcome.last_status,
        error=outcome.error,
        attempts=attempt,
    )


class Policy:
    """What happens after an attempt: done, later (same attempt), retry (next attempt) or dead.

    `reschedule(attempt, delay)` puts the work back in the retry schedule; `dead(reason)`
    dead-letters it. Both are given by the task, which knows what "the work" is.
    """

    def __init__(self, rt: Runtime, attempt: int, first_seen_ms: int | None) -> None:
        self.rt = rt
        self.attempt = attempt
        self.now_ms = time.time_ns() // 1_000_000
        self.first_seen_ms = first_seen_ms or self.now_ms

    def apply(self, outcome: Outcome, reschedule: Callable[[int, float], None], dead: Callable[[str], None]) -> None:
        rt, attempt = self.rt, self.attempt
        if outcome.status == "delivered":
            _log_attempt(outcome, attempt, None)
            return
        if outcome.status == "deferred":
            # The rate limit, a 429 pause or a busy audience said "not yet": same attempt, later.
            reschedule(attempt, outcome.retry_after or 1.0)
            _log_attempt(outcome, attempt, outcome.retry_after)
            return
        if outcome.status == "retry":
            wait = backoff_seconds(attempt, rt, outcome.retry_after)
            age = (self.now_ms - self.first_seen_ms) / 1000 + wait
            if attempt >= rt.settings.retry_max_attempts or age > rt.settings.retry_max_age_seconds:
                reason = "max_attempts" if attempt >= rt.settings.retry_max_attempts else "max_age"
                outcome.status = "dead"
                _log_attempt(outcome, attempt, None)
                dead(reason)
                return
            # Attempts count failures in a row: an attempt that got part of the message through
            # (some partner calls answered 2xx) starts the count again for what is left.
            reschedule(2 if outcome.sent else attempt + 1, wait)
            stats.incr(rt.redis, rt.keys, stats.RETRIED)
            _log_attempt(outcome, attempt, wait)
            return
        _log_attempt(outcome, attempt, None)
        dead(outcome.reason or "unknown")


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
                time.sleep(1.0)  # not a hot loop while Redis comes back
                raise Reject(f"Redis error: {type(exc).__name__}", requeue=True) from None
            except Exception as exc:
                log.exception("task_failed", extra={"event": "task_failed", "error": type(exc).__name__})
                rt = runtime()
                attempt = kwargs.get("attempt", 1)
                try:
                    for body in bodies_of(*args, **kwargs):
                        failure = Outcome("dead", error=type(exc).__name__, message_type=None)
                        _dead(rt, body, _identify(body, failure), "internal_error", attempt)
                except redis.RedisError:
                    raise Reject("could not dead-letter", requeue=True) from None

        return run

    return wrap


def _identify(body: str, outcome: Outcome) -> Outcome:
    """The outcome, with the ids read from the message itself (for its dead letter)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return outcome
    return dataclasses.replace(
        outcome, message_id=message_id_of(message), account_id=account_id_of(message), message_type=_type(message)
    )


def _type(message: Any) -> str | None:
    kind = message.get("type") if isinstance(message, dict) else None
    return kind if isinstance(kind, str) else None


@shared_task(name=DELIVER_TASK, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
@_never_lost(lambda body, *_, **__: [body])
def deliver(body: str, attempt: int = 1, first_seen_ms: int | None = None) -> None:
    """Attempt `attempt` to deliver one accepted message.

    Waits never happen here: a retry or a rate-limited message goes to the retry schedule
    (workers/scheduler.py) and this task ends, so no worker is parked and no countdown can
    outlive the broker's visibility timeout.
    """
    rt = runtime()
    policy = Policy(rt, attempt, first_seen_ms)
    outcome = deliver_message(body, rt)
    if outcome.status == "delivered":
        stats.incr(rt.redis, rt.keys, stats.DELIVERED)

    def reschedule(next_attempt: int, delay: float) -> None:
        rt.retries.schedule(
            body,
            message_id=outcome.message_id or "",
            message_type=outcome.message_type or "",
            attempt=next_attempt,
            first_seen_ms=policy.first_seen_ms,
            delay=delay,
        )

    policy.apply(outcome, reschedule, lambda reason: _dead(rt, body, outcome, reason, attempt))


@shared_task(name=DELIVER_EVENTS_TASK, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
@_never_lost(lambda bodies, *_, **__: list(bodies))
def deliver_events(bodies: list[str], attempt: int = 1, first_seen_ms: int | None = None) -> None:
    """Attempt `attempt` to deliver a group of event batches for one API key in one partner call."""
    rt = runtime()
    policy = Policy(rt, attempt, first_seen_ms)
    group = deliver_event_group(bodies, rt)
    for body, why in group.dead:
        _log_attempt(why, attempt, None)
        _dead(rt, body, why, why.reason or "unknown", attempt)
    if group.delivered:
        stats.incr(rt.redis, rt.keys, stats.DELIVERED, group.delivered)
    if not group.pending:
        if group.delivered:
            _log_attempt(group.outcome, attempt, None)
        return

    def reschedule(next_attempt: int, delay: float) -> None:
        members = orjson.dumps([body for body, _ in group.pending]).decode()
        rt.retries.schedule(
            members,
            message_id=hashlib.sha256(members.encode()).hexdigest()[:32],
            message_type=GROUP,
            attempt=next_attempt,
            first_seen_ms=policy.first_seen_ms,
            delay=delay,
        )

    def dead(reason: str) -> None:
        for body, operation in group.pending:
            _dead(rt, body, member_outcome(group.outcome, operation), reason, attempt)

    policy.apply(group.outcome, reschedule, dead)
