"""Which lane each inbox entry waits in, and which Celery task it becomes: event batches for
the same partner API key travel together, so one partner call carries many users' batches.

A plain function of the entries read from the inbox, unit-tested without Redis or Celery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from common.keys import partner_key
from schemas.fields import is_header_value
from schemas.messages import EVENTS

# The inbox entry type of a group of event batches that failed together and is retried as one:
# a group keeps its members, so a retry sends exactly the payload (and Idempotency-Key) that
# the partner may already have taken.
GROUP = "group"
# The inbox entry type of one partner operation of a message that was split into units
# (workers/units.py): it goes to `firehose.deliver` like any single message, its body says it is a unit.
UNIT = "unit"


@dataclass
class Job:
    """One Celery task to publish."""

    task: str  # "single" or "events"
    bodies: list[str]
    attempt: int
    first_seen_ms: int
    task_id: str | None = None
    entry_ids: list[bytes] = field(default_factory=list)


# The lane of messages without a usable API key: they are dead-lettered at their first
# attempt, so sharing one lane costs nobody a turn for long. Never a partner key's hash
# (16 hex digits), so it cannot collide with one.
NO_KEY_LANE = "nokey"


def _api_key(message: Any) -> str | None:
    account = message.get("account") if isinstance(message, dict) else None
    settings = account.get("account_settings") if isinstance(account, dict) else None
    api_key = settings.get("apiKey") if isinstance(settings, dict) else None
    return api_key if isinstance(api_key, str) and api_key else None


def lane_of(fields: dict[bytes, bytes]) -> str:
    """The lane an inbox entry waits in: its own `lane` field, else its API key's hash.

    Lanes take turns, so a key with thousands of messages waiting never stands in front of
    another key's one. A group (retried as one) waits in its first member's lane.
    """
    lane = fields.get(b"lane")
    if lane:
        return lane.decode()
    try:
        message: Any = orjson.loads(fields.get(b"body", b""))
        if fields.get(b"type", b"").decode() == GROUP and isinstance(message, list) and message:
            message = orjson.loads(message[0]) if isinstance(message[0], str) else message[0]
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        return NO_KEY_LANE
    api_key = _api_key(message)
    return partner_key(api_key) if api_key else NO_KEY_LANE


def _event_group_key(body: str) -> tuple[str, int] | None:
    """(partner key, event count) of an event batch that can share a call; None otherwise."""
    try:
        message: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type") != EVENTS:
        return None
    api_key = _api_key(message)
    events = message.get("events")
    if events is None:
        events = []  # an eventless batch (notifications only) shares a call like any other
    if api_key is None or not isinstance(events, list) or not is_header_value(api_key):
        # The single-message path dead-letters it with the reason; alone, so it never shares
        # an attempt with a neighbour (an apiKey no header can carry: invalid_api_key).
        return None
    return partner_key(api_key), len(events)


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[str, str, int, int, str | None]:
    """(body, type, attempt, first seen ms, task id) of an entry; raises ValueError if unreadable."""
    body = fields[b"body"].decode() if b"body" in fields else ""
    kind = fields.get(b"type", b"").decode()
    attempt = int(fields.get(b"attempt", b"1"))
    # A stream id starts with the time Redis stored the entry: for a new message, the
    # moment it was accepted, from which its maximum age counts.
    first_seen = int(fields.get(b"first_seen") or entry_id.split(b"-")[0])
    task_id = fields.get(b"id", b"").decode() or None
    return body, kind, attempt, first_seen, task_id


def _group_members(body: str) -> list[str]:
    """A retried group's member bodies; raises ValueError if the entry holds no such list."""
    members = orjson.loads(body)
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise ValueError("a group entry holds a list of message bodies")
    return members


def plan_jobs(entries: list[tuple[bytes, dict[bytes, bytes]]], max_messages: int, max_events: int) -> list[Job]:
    """Group fresh event batches by API key, up to `max_messages` and `max_events` a call."""
    jobs: list[Job] = []
    open_groups: dict[str, Job] = {}
    open_events: dict[str, int] = {}
    for entry_id, fields in entries:
        try:
            body, kind, attempt, first_seen, task_id = _entry(entry_id, fields)
            members = _group_members(body) if kind == GROUP else None
        except (ValueError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            # An entry that cannot be read (a replayed letter written by hand, say) goes alone,
            # where the task dead-letters it with its reason; it never fails the round's others.
            body = fields.get(b"body", b"").decode(errors="replace")
            jobs.append(Job("single", [body], 1, int(entry_id.split(b"-")[0]), None, [entry_id]))
            continue
        if members is not None:
            jobs.append(Job("events", members, attempt, first_seen, task_id, [entry_id]))
            continue
        grouping = _event_group_key(body) if kind == EVENTS and max_messages > 1 else None
        if grouping is None:
            jobs.append(Job("single", [body], attempt, first_seen, task_id, [entry_id]))
            continue
        key, events = grouping
        job = open_groups.get(key)
        if job is None or len(job.bodies) >= max_messages or open_events[key] + events > max_events:
            job = Job("events", [], attempt, first_seen, None, [])
            open_groups[key], open_events[key] = job, 0
            jobs.append(job)
        job.bodies.append(body)
        job.entry_ids.append(entry_id)
        job.first_seen_ms = min(job.first_seen_ms, first_seen)
        job.attempt = max(job.attempt, attempt)
        open_events[key] += events
    return jobs
