"""Delivering one accepted message: plan its partner operations and send those not yet sent.

A plain function of the message and the runtime; the Celery task around it adds only the
retry policy and logging.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.fields import MessageInvalid
from workers.mapping import PermanentFailure, Plan, plan_message
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: str  # "delivered", "retry" or "dead"
    message_id: str | None = None
    account_id: int | None = None
    message_type: str | None = None
    reason: str | None = None
    last_status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    operations: int = 0
    sent: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def _count_skipped(rt: Runtime, skipped: dict[str, int]) -> None:
    if skipped:
        pipe = rt.redis.pipeline(transaction=False)
        for reason, n in skipped.items():
            pipe.hincrby(rt.keys.skipped_events, reason, n)
        pipe.execute()


def deliver_message(body: str | bytes, rt: Runtime) -> Outcome:
    try:
        message: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Outcome("dead", reason="invalid_json")
    kind = message.get("type") if isinstance(message, dict) else None
    try:
        plan: Plan = plan_message(message)
    except MessageInvalid as exc:
        return Outcome(
            "dead",
            message_id=_id(message),
            account_id=_account_id(message),
            message_type=kind,
            reason="invalid_message",
            error=str(exc)[:500],
        )
    except PermanentFailure as exc:
        return Outcome(
            "dead",
            message_id=_id(message),
            account_id=_account_id(message),
            message_type=kind,
            reason=exc.reason,
            error=exc.detail,
        )

    outcome = Outcome(
        "delivered",
        message_id=plan.message_id,
        account_id=plan.account_id,
        message_type=kind,
        operations=len(plan.operations),
        skipped=plan.skipped,
    )
    _count_skipped(rt, plan.skipped)
    for operation in plan.operations:
        key = operation.idempotency_key()
        marker = rt.keys.delivered(key)
        # The partner already took this payload (an earlier attempt, a replay, or a pump
        # that published the message twice): never send it again.
        if rt.redis.exists(marker):
            continue
        result = rt.partner.send(operation, key)
        outcome.last_status = result.status
        if result.outcome == "ok":
            rt.redis.set(marker, 1, ex=rt.settings.dedup_ttl_seconds)
            outcome.sent += 1
            continue
        outcome.error = result.error
        outcome.retry_after = result.retry_after
        outcome.status = "retry" if result.outcome == "transient" else "dead"
        outcome.reason = "partner_transient" if outcome.status == "retry" else "partner_rejected"
        return outcome
    return outcome


def _id(message: Any) -> str | None:
    if isinstance(message, dict) and isinstance(message.get("id"), str):
        return message["id"][:64]
    return None


def _account_id(message: Any) -> int | None:
    account = message.get("account") if isinstance(message, dict) else None
    account_id = account.get("account_id") if isinstance(account, dict) else None
    return account_id if isinstance(account_id, int) and not isinstance(account_id, bool) else None
