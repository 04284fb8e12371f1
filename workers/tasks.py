"""Celery tasks: thin wrappers that add the retry policy and logging to workers.delivery."""

from __future__ import annotations

import logging
import random

from celery import Task, shared_task

from workers import dead_letters
from workers.celery_app import DELIVER_TASK
from workers.delivery import Outcome, deliver_message
from workers.runtime import Runtime, runtime

log = logging.getLogger(__name__)


def backoff_seconds(attempt: int, rt: Runtime, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, never less than the partner's Retry-After.

    Capped well under the broker's visibility timeout: a countdown longer than that makes
    Redis hand the same message to another worker while this one still holds it.
    """
    settings = rt.settings
    cap = min(settings.retry_backoff_max, settings.broker_visibility_timeout / 2)
    delay = random.uniform(0, min(cap, settings.retry_backoff_base * 2 ** (attempt - 1)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


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
            "status": outcome.last_status,
            "wait": wait,
        },
    )


@shared_task(name=DELIVER_TASK, bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def deliver(self: Task, body: str) -> None:
    rt = runtime()
    attempt = self.request.retries + 1
    outcome = deliver_message(body, rt)
    if outcome.status == "retry" and attempt < rt.settings.retry_max_attempts:
        wait = backoff_seconds(attempt, rt, outcome.retry_after)
        rt.redis.hincrby(rt.keys.stats, "retried", 1)
        _log_attempt(outcome, attempt, wait)
        raise self.retry(countdown=wait, max_retries=None)
    _log_attempt(outcome, attempt, None)
    if outcome.status == "delivered":
        rt.redis.hincrby(rt.keys.stats, "delivered", 1)
        return
    dead_letters.add(
        rt.redis,
        rt.keys,
        body,
        reason="max_attempts" if outcome.status == "retry" else (outcome.reason or "unknown"),
        message_id=outcome.message_id,
        account_id=outcome.account_id,
        message_type=outcome.message_type,
        last_status=outcome.last_status,
        error=outcome.error,
        attempts=attempt,
    )
