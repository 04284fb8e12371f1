"""The delivery decision, in one place: plan → gate → send → decide.

One attempt takes some accepted messages, its *members*: one message (task `firehose.deliver`)
or a group of event batches for one API key (`firehose.deliver_events`). A single message is a
group of one; both go the same way:

  plan    each member's Operations (workers/mapping.py). A member that can never be delivered
          as it is is rejected with its reason; operations already marked delivered are dropped.
          The event batches left become one call per API key; every other operation is a call
          of its own.
  gate    per call: the API key's partner gate (workers/gate.py: already delivered, claimed by a
          twin, breaker, 429 pause, in-flight cap, rate limit), and for member changes first the
          audience lock and the drop of changes the partner already has something newer for.
          Nothing waits here: a gate that says "not yet" is a Hold, and the work is deferred.
  send    the partner client; its answer is a Verdict; leaving the gate with it marks the work
          delivered on 2xx, pauses the key on 429 and tells the breaker.
  decide  `decide()`, a plain function of the attempt's Outcome: delivered, retry (next attempt,
          after a backoff), defer (same attempt, after the gate's wait) or dead (with a reason).

The Celery tasks (workers/tasks.py) apply the Decision: reschedule, dead-letter, count, log.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import orjson

from common import stats
from common.config import Settings
from common.marks import Marks
from schemas.fields import MessageInvalid, is_header_value
from workers import repair, units
from workers.gate import CallResult, Hold, Ticket, lift_suspension
from workers.mapping import PermanentFailure, identity_encodings_for, plan_message
from workers.partner.base import Operation, OperationKind, PartnerResult
from workers.runtime import Runtime

log = logging.getLogger(__name__)

# A deferral comes back a little after its wait, by a random amount up to this share of it (at
# least _DEFER_JITTER_MIN_SECONDS, at most _DEFER_JITTER_MAX_SECONDS): a herd held together (an
# open breaker, a full rate window) does not come back in the same millisecond.
_DEFER_JITTER_SHARE = 0.1
_DEFER_JITTER_MIN_SECONDS = 0.02
_DEFER_JITTER_MAX_SECONDS = 2.0
# A suspension flag outlives any fix the customer would make; a fix clears it sooner.
SUSPEND_TTL_SECONDS = 30 * 86400


class Verdict(StrEnum):
    """The partner's answer to one call, as far as delivery is concerned."""

    OK = "ok"
    TRANSIENT = "transient"  # try again later
    PERMANENT = "permanent"  # never deliverable as it is


# mParticle's own list of retryable statuses, which is also the usual webhook practice.
TRANSIENT_STATUSES = frozenset({408, 429})


def classify(status: int | None) -> Verdict:
    """No answer (a timeout, a refused connection), 408, 429 and 5xx are transient."""
    if status is None:
        return Verdict.TRANSIENT
    if 200 <= status < 300:
        return Verdict.OK
    if status in TRANSIENT_STATUSES or 500 <= status < 600:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


class Action(StrEnum):
    """What becomes of the work after an attempt. The values are the `outcome` of log lines."""

    DELIVERED = "delivered"
    RETRY = "retry"  # next attempt, after a backoff
    DEFER = "deferred"  # same attempt, after the gate's wait
    DEAD = "dead"  # to the dead letters, with a reason


class DeadReason(StrEnum):
    """Dead-letter reasons decided here (the mapping adds its own, e.g. missing_api_key)."""

    PARTNER_REJECTED = "partner_rejected"
    MAX_ATTEMPTS = "max_attempts"
    MAX_AGE = "max_age"
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    INVALID_API_KEY = "invalid_api_key"  # cannot be an HTTP header value (control character, not Latin-1)
    UNSERIALISABLE = "unserialisable"  # its payload cannot be written as JSON (nested too deep)
    INTERNAL_ERROR = "internal_error"


_INVALID_API_KEY_DETAIL = "account.account_settings.apiKey is not a valid HTTP header value"


RETRY_REASON = "partner_transient"


@dataclass(frozen=True)
class Member:
    """One accepted message of the work, planned."""

    body: str
    message_id: str | None
    account_id: int | None
    message_type: str | None
    # Its operations the partner does not have yet, with their idempotency keys (the delivered marks).
    operations: tuple[Operation, ...] = ()
    marks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejected:
    """A member that can never be delivered as it is: dead-lettered at once, on its own."""

    body: str
    message_id: str | None
    account_id: int | None
    message_type: str | None
    reason: str
    error: str | None = None


@dataclass(frozen=True)
class Call:
    """One partner call, and the delivered marks it earns when the partner takes it."""

    operation: Operation
    marks: tuple[str, ...]
    account_id: int | None  # whose audience subscription a 401/403 suspends

    @property
    def key(self) -> str:
        """The call's own idempotency key, as planned: what its claim and delivered mark are named
        by. A call of one operation has it as its mark; a merged call has its own besides."""
        return self.marks[0] if len(self.marks) == 1 else self.operation.idempotency_key()


@dataclass(frozen=True)
class Outcome:
    """How far one attempt got.

    `hold` set: a gate stopped it before its next call (`wait`: for how long). Otherwise
    `verdict` is the partner's on the last call made (OK when every call was taken, or none was
    needed) and `wait` is the partner's Retry-After, if any.
    """

    verdict: Verdict = Verdict.OK
    hold: Hold | None = None
    wait: float | None = None
    last_status: int | None = None
    error: str | None = None
    sent: int = 0  # calls the partner took in this attempt


@dataclass(frozen=True)
class Decision:
    action: Action
    attempt: int  # the attempt the work runs as next; for DELIVERED and DEAD, the one just made
    delay: float | None = None  # RETRY and DEFER: seconds until it runs again
    reason: str | None = None  # DEAD: the dead-letter reason; DEFER: the Hold; RETRY: RETRY_REASON


@dataclass(frozen=True)
class Attempt:
    """What one attempt did, member by member."""

    outcome: Outcome
    delivered: tuple[Member, ...]  # the partner has every operation of these (now or before)
    pending: tuple[Member, ...]  # still to deliver: retried, deferred or dead-lettered together
    rejected: tuple[Rejected, ...]

    @property
    def message_id(self) -> str | None:
        """For the attempt's log line: the message's id, or how many a group had."""
        members = self.pending + self.delivered
        return members[0].message_id if len(members) == 1 else f"group of {len(members)}"

    @property
    def account_id(self) -> int | None:
        members = self.pending + self.delivered
        return members[0].account_id if members else None


class Jitter(Protocol):
    """A source of randomness: the `random` module itself, or a seeded `random.Random` in tests."""

    def uniform(self, a: float, b: float) -> float: ...


# ---------------------------------------------------------------- decide


def backoff_seconds(attempt: int, settings: Settings, retry_after: float | None = None, rng: Jitter = random) -> float:
    """Exponential backoff with full jitter, never less than the partner's Retry-After.

    Attempt n waits a random time in [0, min(RETRY_BACKOFF_MAX, BASE * 2^(n-1))]; a
    Retry-After raises that to its value, capped by RETRY_AFTER_MAX_SECONDS.
    """
    delay = rng.uniform(0, min(settings.retry_backoff_max, settings.retry_backoff_base * 2 ** (attempt - 1)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.retry_after_max_seconds))
    return delay


def deferral_seconds(wait: float | None, rng: Jitter = random) -> float:
    """The gate's wait (1 s when it named none), plus a little jitter: never earlier than the wait."""
    base = 1.0 if wait is None else max(0.0, wait)
    spread = min(max(base * _DEFER_JITTER_SHARE, _DEFER_JITTER_MIN_SECONDS), _DEFER_JITTER_MAX_SECONDS)
    return base + rng.uniform(0, spread)


def decide(
    outcome: Outcome, *, attempt: int, first_seen_ms: int, now_ms: int, settings: Settings, rng: Jitter = random
) -> Decision:
    """What to do with the work after attempt number `attempt`."""
    if outcome.hold is not None:
        # A gate is no failure of the partner's: the same attempt runs again once it opens.
        delay = deferral_seconds(outcome.wait, rng)
        # But not for ever: work held past the age at which it stops being worth sending (an
        # endpoint down for a day keeps its breaker open) is dead, like a retry would be.
        if (now_ms - first_seen_ms) / 1000 + delay > settings.retry_max_age_seconds:
            return Decision(Action.DEAD, attempt, reason=DeadReason.MAX_AGE)
        return Decision(Action.DEFER, attempt, delay, outcome.hold)
    if outcome.verdict is Verdict.OK:
        return Decision(Action.DELIVERED, attempt)
    if outcome.verdict is Verdict.PERMANENT:
        return Decision(Action.DEAD, attempt, reason=DeadReason.PARTNER_REJECTED)
    delay = backoff_seconds(attempt, settings, outcome.wait, rng)
    if attempt >= settings.retry_max_attempts:
        return Decision(Action.DEAD, attempt, reason=DeadReason.MAX_ATTEMPTS)
    # Dead now rather than retried past the age at which the data stops being worth sending.
    if (now_ms - first_seen_ms) / 1000 + delay > settings.retry_max_age_seconds:
        return Decision(Action.DEAD, attempt, reason=DeadReason.MAX_AGE)
    # Attempts count failures in a row: an attempt that got part of the work through (some
    # partner calls answered 2xx) starts the count again for what is left.
    return Decision(Action.RETRY, 2 if outcome.sent else attempt + 1, delay, RETRY_REASON)


# ---------------------------------------------------------------- plan → gate → send


def attempt_delivery(bodies: Sequence[str], rt: Runtime) -> Attempt:
    """One attempt at delivering these accepted messages (one, or a group of event batches)."""
    members, rejected = plan(bodies, rt)
    return deliver_planned(members, rejected, rt)


def deliver_planned(members: Sequence[Member], rejected: Sequence[Rejected], rt: Runtime) -> Attempt:
    """Gate, send and sort what `plan` made (run_attempt plans first: a big message is split instead)."""
    outcome, marked = _send_calls(rt, calls_for(members))
    done = [all(mark in marked for mark in member.marks) for member in members]
    return Attempt(
        outcome,
        delivered=tuple(m for m, ok in zip(members, done, strict=True) if ok),
        pending=tuple(m for m, ok in zip(members, done, strict=True) if not ok),
        rejected=tuple(rejected),
    )


def plan(bodies: Sequence[str], rt: Runtime) -> tuple[list[Member], list[Rejected]]:
    """Each body as a Member with the operations still to send, or Rejected (skipped events counted)."""
    members: list[Member] = []
    rejected: list[Rejected] = []
    skipped: Counter[str] = Counter()
    # Erasure identities are encoded as the registration in effect asks events to carry them.
    encodings = identity_encodings_for(rt.settings)
    for body in bodies:
        planned = _plan_one(body, encodings)
        if isinstance(planned, Rejected):
            rejected.append(planned)
        else:
            members.append(planned[0])
            skipped.update(planned[1])
    _count_skipped(rt, skipped)
    marks = [mark for member in members for mark in member.marks]
    if not marks:
        return members, rejected
    # The partner already took these (an earlier attempt, a replay, or a pump that published the
    # message twice): never send them again.
    found = Marks(rt.redis, rt.keys, rt.settings.dedup_ttl_seconds).delivered(marks)
    taken = {mark for mark, exists in zip(marks, found, strict=True) if exists}
    return [_without(member, taken) for member in members], rejected


def calls_for(members: Sequence[Member]) -> list[Call]:
    """Event batches for one API key share one call; any other operation is a call of its own.

    The merged payload (and so its Idempotency-Key) depends only on the members and their
    order, which is why a group that fails is retried as the same group (workers/grouping.py).
    For a single message the call is its own operation, unchanged.
    """
    order: list[str | Call] = []
    events: dict[str, list[tuple[Operation, str, int | None]]] = {}
    for member in members:
        for operation, mark in zip(member.operations, member.marks, strict=True):
            if operation.kind is OperationKind.EVENTS:
                key = operation.partner_key()
                if key not in events:
                    events[key] = []
                    order.append(key)
                events[key].append((operation, mark, member.account_id))
            else:
                order.append(Call(operation, (mark,), member.account_id))
    return [item if isinstance(item, Call) else _merged(events[item]) for item in order]


def _merged(parts: list[tuple[Operation, str, int | None]]) -> Call:
    first, _, account_id = parts[0]
    if len(parts) == 1:
        return Call(first, (parts[0][1],), account_id)
    operation = Operation(
        OperationKind.EVENTS,
        {"batches": [batch for op, _, _ in parts for batch in op.payload["batches"]]},
        first.api_key,
        message_id=",".join(op.message_id or "" for op, _, _ in parts),
    )
    return Call(operation, tuple(mark for _, mark, _ in parts), account_id)


@dataclass(frozen=True)
class _Step:
    """One call's way through its gates: the partner's answer, a hold, or nothing left to send."""

    result: PartnerResult | None = None
    hold: Hold | None = None
    wait: float | None = None
    marked: bool = False  # the gate wrote the call's delivered marks as it let go


def _send_calls(rt: Runtime, calls: Sequence[Call]) -> tuple[Outcome, set[str]]:
    """Send the calls in order, stopping at the first one not taken; returns the marks written."""
    sent, last_status = 0, None
    marked: set[str] = set()
    for call in calls:
        step = _through_gates(rt, call)
        if step.hold is not None:
            return Outcome(hold=step.hold, wait=step.wait, last_status=last_status, sent=sent), marked
        if step.result is not None:
            last_status = step.result.status
            verdict = classify(step.result.status)
            if verdict is not Verdict.OK:
                answer = step.result
                outcome = Outcome(
                    verdict, wait=answer.retry_after, last_status=answer.status, error=answer.error, sent=sent
                )
                return outcome, marked
            sent += 1
        if not step.marked:
            # No call was needed (a twin delivered it, or the partner had newer state for all of
            # it): written here, so the work is never looked at again.
            Marks(rt.redis, rt.keys, rt.settings.dedup_ttl_seconds).add_delivered(call.marks)
        marked.update(call.marks)
    return Outcome(Verdict.OK, last_status=last_status, sent=sent), marked


def _through_gates(rt: Runtime, call: Call) -> _Step:
    operation = call.operation
    if operation.kind in (OperationKind.AUDIENCE_UPSERT, OperationKind.AUDIENCE_DELETE):
        # The audience's own changes, one at a time with its member calls, only forward in time.
        with rt.audiences.locked(operation) as lock:
            if not lock:
                return _Step(hold=Hold.AUDIENCE_BUSY, wait=lock.wait)
            if rt.audiences.subscription_is_stale(operation):
                return _Step()  # the partner already has a newer change of this audience
            step = _gated_send(rt, call, operation)
            if step.result is not None and classify(step.result.status) is Verdict.OK:
                rt.audiences.record_subscription(operation)
            return step
    if operation.kind is not OperationKind.MEMBERS:
        return _gated_send(rt, call, operation)
    # Member changes go one call per audience at a time, and only forward in time.
    with rt.audiences.locked(operation) as lock:
        if not lock:
            return _Step(hold=Hold.AUDIENCE_BUSY, wait=lock.wait)
        fresh = rt.audiences.fresh_changes(operation)
        if fresh is None:
            return _Step()  # the partner already has newer state for every user here
        step = _gated_send(rt, call, fresh)
        if step.result is not None and classify(step.result.status) is Verdict.OK:
            rt.audiences.record(fresh)
        return step


def _gated_send(rt: Runtime, call: Call, operation: Operation) -> _Step:
    """Through the API key's gate, then the partner; `operation` is the call's, or what is left of it."""
    partner_key = operation.partner_key()
    # A merged call is also already delivered when each of its members is (other copies took them).
    ticket = rt.gate.enter(partner_key, call.key, call.marks if len(call.marks) > 1 else ())
    if ticket.already:
        return _Step()
    if ticket.hold is not None:
        if ticket.hold in (Hold.RATE_LIMITED, Hold.PAUSED):
            stats.incr(rt.redis, rt.keys, stats.RATE_LIMITED)
        return _Step(hold=ticket.hold, wait=ticket.wait)
    result: PartnerResult | None = None
    try:
        result = _send(rt, operation)
    finally:
        # Whatever happened, the claim and the lease go back now rather than when they expire.
        _leave(rt, ticket, call, result)
    if operation.kind.is_audience and call.account_id is not None:
        _track_credentials(rt, operation, call.account_id, result.status)
    return _Step(result=result, marked=classify(result.status) is Verdict.OK)


def _leave(rt: Runtime, ticket: Ticket, call: Call, result: PartnerResult | None) -> None:
    if result is None:
        rt.gate.leave(ticket, CallResult.NONE)
        return
    verdict = classify(result.status)
    if result.status == 429:
        # A 429 speaks for the whole API key: pause every worker's calls to it, not just this task.
        # It is throttling, not an endpoint failing: the breaker does not count it.
        pause = min(result.retry_after or 1.0, rt.settings.retry_after_max_seconds)
        rt.gate.leave(ticket, CallResult.THROTTLED, pause_seconds=pause)
    elif verdict is Verdict.OK:
        # The call's own mark too (a merged call's key): a twin of the same group that passed the
        # plan's check finds it at the gate. Written as the claim goes, never after.
        rt.gate.leave(ticket, CallResult.OK, marks=dict.fromkeys((*call.marks, call.key)))
    elif verdict is Verdict.PERMANENT:
        rt.gate.leave(ticket, CallResult.REJECTED)
    else:
        rt.gate.leave(ticket, CallResult.FAILED)


def _send(rt: Runtime, operation: Operation) -> PartnerResult:
    started = time.monotonic()
    result = rt.partner.send(operation, operation.idempotency_key())
    pipe = rt.redis.pipeline(transaction=False)
    stats.incr(pipe, rt.keys, stats.PARTNER_CALLS)
    stats.record_latency(pipe, rt.keys, time.monotonic() - started)
    pipe.execute()
    return result


def _track_credentials(rt: Runtime, operation: Operation, account_id: int, status: int | None) -> None:
    """A 401/403 on audience calls asks mParticle to suspend the subscription; a success with the
    refused key itself clears it (a success with another key proves nothing about that one)."""
    flag = rt.keys.suspended(account_id)
    if status in (401, 403):
        rt.redis.set(flag, operation.partner_key(), ex=SUSPEND_TTL_SECONDS)
    elif status is not None and 200 <= status < 300:
        lift_suspension(rt.redis, flag, operation.partner_key())


def _plan_one(body: str, identity_encodings: dict[str, str] | None = None) -> tuple[Member, dict[str, int]] | Rejected:
    """The member and its skipped events by reason, or why it is rejected."""
    try:
        message: Any = repair.load_body(body)
    except orjson.JSONDecodeError:
        return Rejected(body, None, None, None, DeadReason.INVALID_JSON)
    if units.is_unit(message):
        # A unit of a split message (workers/units.py): already mapped, one operation, its own key.
        try:
            unit = units.decode(message)
        except units.UnitInvalid as exc:
            return Rejected(body, *units.identify(message), DeadReason.INVALID_MESSAGE, str(exc)[:500])
        op = unit.operation
        if not is_header_value(op.api_key):
            return Rejected(body, *units.identify(message), DeadReason.INVALID_API_KEY, _INVALID_API_KEY_DETAIL)
        return Member(body, unit.message_id, unit.account_id, unit.message_type, (op,), (op.idempotency_key(),)), {}
    try:
        planned = plan_message(message, identity_encodings)
        operations = tuple(planned.operations)
        bad_key = next((op for op in operations if not is_header_value(op.api_key)), None)
        if bad_key is not None:
            # Its Authorization header cannot be written: no attempt would ever get through.
            return Rejected(body, *identify(message), DeadReason.INVALID_API_KEY, _INVALID_API_KEY_DETAIL)
        # Serialising each operation here (its idempotency key) is what lets a group's call be
        # made of members that all serialise: a merged payload nests no deeper than its parts.
        try:
            marks = tuple(op.idempotency_key() for op in operations)
        except orjson.JSONEncodeError:
            # An item nested too deep to write, which the door leaves to the worker
            # (workers/repair.py): skipped and counted, and the rest planned again.
            message, dropped = repair.without_deep_items(message)
            if not dropped:
                raise
            planned = plan_message(message, identity_encodings)
            operations = tuple(planned.operations)
            marks = tuple(op.idempotency_key() for op in operations)
            planned.skipped = dict(Counter(planned.skipped) + Counter({repair.UNSERIALISABLE: dropped}))
    except MessageInvalid as exc:
        return Rejected(body, *identify(message), DeadReason.INVALID_MESSAGE, str(exc)[:500])
    except PermanentFailure as exc:
        return Rejected(body, *identify(message), exc.reason, exc.detail)
    except orjson.JSONEncodeError as exc:
        # Nested deeper than orjson writes outside its items (the door refuses those since it checks).
        return Rejected(body, *identify(message), DeadReason.UNSERIALISABLE, str(exc)[:500])
    except Exception as exc:  # one member's fault must not take its group's
        log.exception("plan_failed", extra={"event": "plan_failed", "error": type(exc).__name__})
        return Rejected(body, *identify(message), DeadReason.INTERNAL_ERROR, type(exc).__name__)
    member = Member(body, planned.message_id, planned.account_id, planned.message_type, operations, marks)
    return member, planned.skipped


def _without(member: Member, taken: set[str]) -> Member:
    if not taken.intersection(member.marks):
        return member
    kept = [(op, mark) for op, mark in zip(member.operations, member.marks, strict=True) if mark not in taken]
    return Member(
        member.body,
        member.message_id,
        member.account_id,
        member.message_type,
        tuple(op for op, _ in kept),
        tuple(mark for _, mark in kept),
    )


def _count_skipped(rt: Runtime, skipped: Counter[str]) -> None:
    if skipped:
        pipe = rt.redis.pipeline(transaction=False)
        # Reasons can carry what a message wrote (a DSR's request type): stored from the fixed set
        # /metrics exports, so no message adds a field, or its bytes, to Redis or a scrape.
        for reason, n in skipped.items():
            pipe.hincrby(rt.keys.skipped_events, stats.skip_reason(reason), n)
        pipe.execute()


def identify(message: Any) -> tuple[str | None, int | None, str | None]:
    """(message id, account id, type) as far as the message has them, for logs and dead letters."""
    return message_id_of(message), account_id_of(message), type_of(message)


def identify_body(body: str) -> tuple[str | None, int | None, str | None]:
    try:
        return identify(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None, None, None


def message_id_of(message: Any) -> str | None:
    if isinstance(message, dict) and isinstance(message.get("id"), str):
        return message["id"][:64]
    return None


def account_id_of(message: Any) -> int | None:
    account = message.get("account") if isinstance(message, dict) else None
    account_id = account.get("account_id") if isinstance(account, dict) else None
    return account_id if isinstance(account_id, int) and not isinstance(account_id, bool) else None


def type_of(message: Any) -> str | None:
    kind = message.get("type") if isinstance(message, dict) else None
    return kind if isinstance(kind, str) else None
