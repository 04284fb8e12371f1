"""Keeping audience membership convergent at the partner.

mParticle retries, workers run in parallel and the partner fails at times, so an `add` sent
before a `delete` could otherwise be acknowledged after it. Two rules prevent that:

1. One member call per (partner API key, audience) in flight at a time: a lock in Redis.
   With calls serialised, the partner acknowledges them in the order we send them.
2. Under that lock, a change strictly older than the newest change the partner already
   acknowledged for the same user and audience is dropped before sending: the `applied` hash
   keeps, per user, the `timestamp_ms` of the last acknowledged change. A change *as old as* it
   is sent: mParticle stamps a message to the millisecond, so an `add` and a `delete` of one
   user can share a timestamp, and then the one that arrives last must win (arrival order),
   not the one that happened to be acknowledged first.

So the sequence the partner applies only ever moves each user forward in time, and ends in
the state of the newest change mParticle sent. The audience's own changes (subscription add,
update, remove) take the same lock and keep their own timestamp in the same hash, so a late
`add` never undoes a newer `update`. A `remove` also keeps its timestamp in a field of its own:
the partner deleted the audience with all its members then, so a member change older than it
(a late retry) is dropped rather than recreating the audience; member changes and subscription
`add`s newer than it recreate it. The other way round too: the newest acknowledged member change
of the audience is kept (MEMBERS_FIELD), and a `remove` older than it is dropped, as is a repeat
of the very `remove` last applied (same message: a retry that raced past its delivered mark):
either would delete members the partner took after the removal, for an audience mParticle
evidently subscribed again. Between a `remove` and a member change of the same millisecond,
arrival order decides, as between two member changes.

Within one message a user's changes to one audience collapse into one (`collapse_changes`): the
last `add`/`delete` decides membership, and attribute changes travel with the membership they
belong to, so an `add` followed by an `attribute_update` is an `add` carrying those attributes.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from common.keys import Keys
from workers.partner.base import Operation, OperationKind

# Take the lock, or say how long its holder may keep it (ms): one round trip either way.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then
  return {1, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Record acknowledged timestamps, never moving one backwards.
_RECORD = """
for i = 2, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > current then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# The applied hash's field for the audience itself (created, renamed, removed): users' fields are
# "mpid:…" or "<identities>:…", never this.
SUBSCRIPTION_FIELD = "subscription"
# The newest acknowledged `remove` of the audience: member changes older than it are dropped. Kept
# apart from SUBSCRIPTION_FIELD because a later `add` moves that one on, and a member change from
# before the remove must stay dropped even then (the partner deleted its user with the audience).
REMOVED_FIELD = "subscription:removed"
# The newest acknowledged member change of the audience (any user): a `remove` older than it would
# delete those members too, so it is dropped.
MEMBERS_FIELD = "subscription:members"
# The message id of the `remove` REMOVED_FIELD comes from: its repeat is no new removal.
REMOVED_ID_FIELD = "subscription:removed_id"

# How long the applied timestamps are kept after the audience last changed: longer than any
# message can be retried or replayed (mParticle's data age is 24 h; dead letters may wait longer).
APPLIED_TTL_SECONDS = 30 * 86400


def user_key(user: dict[str, Any]) -> str:
    """A user's identity for ordering: the mpid, else its first identity as type:value."""
    if user.get("mpid"):
        return f"mpid:{user['mpid']}"
    for field in ("user_identities", "device_identities", "partner_identities"):
        for identity in user.get(field) or []:
            return f"{field}:{identity.get('type')}:{identity.get('value')}"
    return "anonymous"


@dataclass(frozen=True)
class Lock:
    """Whether this task holds the audience's lock; if not, `wait`: when to ask again (seconds)."""

    held: bool
    wait: float = 0.0

    def __bool__(self) -> bool:
        return self.held


class AudienceGuard:
    # A busy audience is asked again after its lock's remaining TTL, but no later than this: the
    # holder's call usually ends well within a second, and the TTL only bounds a dead holder.
    busy_wait_max_seconds = 1.0

    def __init__(self, client: redis.Redis, keys: Keys, lock_ttl_seconds: float) -> None:
        self.client = client
        self.keys = keys
        self.lock_ttl_ms = int(lock_ttl_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._record = client.register_script(_RECORD)

    def _names(self, operation: Operation) -> tuple[str, str]:
        scope = f"{operation.partner_key()}:{operation.audience_id}"
        return self.keys.audience_lock(scope), self.keys.audience_applied(scope)

    @contextmanager
    def locked(self, operation: Operation) -> Iterator[Lock]:
        """Yields a true Lock while this task holds the audience's lock; a false one, at once,
        when another task holds it. Never waits: a waiting task would hold a worker slot."""
        lock, _ = self._names(operation)
        token = uuid.uuid4().hex
        taken, pttl = (int(x) for x in self._acquire(keys=[lock], args=[token, self.lock_ttl_ms]))
        if not taken:
            # A PTTL below 10 ms (or -2: released in between): ask again soon, not at once.
            yield Lock(False, min(max(pttl, 10) / 1000.0, self.busy_wait_max_seconds))
            return
        try:
            yield Lock(True)
        finally:
            self._release(keys=[lock], args=[token])

    def fresh_changes(self, operation: Operation) -> Operation | None:
        """The operation without the changes the partner already has something newer for: one change
        per user (`collapse_changes`), none strictly older than the user's last acknowledged change
        or than the audience's last acknowledged `remove`."""
        _, applied = self._names(operation)
        changes: list[dict[str, Any]] = operation.payload["changes"]
        latest = collapse_changes(changes)
        users = list(latest)
        # One round trip: the audience's removal first, then each user's last acknowledged change.
        removed, *seen = self.client.hmget(applied, [REMOVED_FIELD, *users])
        removed_ms = -1 if removed is None else int(removed)
        fresh = [
            change
            for change, ts in zip(latest.values(), seen, strict=True)
            # Equal timestamps are not stale: arrival order decides between them (module docstring).
            if change["timestamp_ms"] >= removed_ms and (ts is None or change["timestamp_ms"] >= int(ts))
        ]
        if not fresh:
            return None
        if len(fresh) == len(changes) and all(a is b for a, b in zip(fresh, changes, strict=True)):
            return operation  # nothing dropped or merged: the very same operation, and key
        payload = dict(operation.payload, changes=fresh)
        return dataclasses.replace(operation, payload=payload)

    def record(self, operation: Operation) -> None:
        """The partner acknowledged these changes: they are the newest it has for these users."""
        _, applied = self._names(operation)
        args: list[Any] = [APPLIED_TTL_SECONDS]
        for change in operation.payload["changes"]:
            args += [user_key(change["user"]), change["timestamp_ms"]]
        # The script keeps the largest, so one entry per change is enough for the audience's newest.
        args += [MEMBERS_FIELD, max(change["timestamp_ms"] for change in operation.payload["changes"])]
        self._record(keys=[applied], args=args)

    def subscription_is_stale(self, operation: Operation) -> bool:
        """True when the partner already acknowledged a newer change of this audience itself:
        a late `add` must not undo an `update`, nor recreate what a `remove` deleted. A `remove`
        is also stale when the partner acknowledged a member change newer than it, or this
        removal (or a newer one) already: sent now, it would delete members added after it."""
        ts = operation.timestamp_ms
        if ts is None:
            return False
        _, applied = self._names(operation)
        seen, removed, members, removed_id = self.client.hmget(
            applied, [SUBSCRIPTION_FIELD, REMOVED_FIELD, MEMBERS_FIELD, REMOVED_ID_FIELD]
        )
        if seen is not None and ts < int(seen):
            return True
        if operation.kind is not OperationKind.AUDIENCE_DELETE:
            return False
        if members is not None and ts < int(members):
            return True
        repeat = removed_id is not None and removed_id.decode() == operation.message_id
        return repeat and removed is not None and ts == int(removed)

    def record_subscription(self, operation: Operation) -> None:
        """The partner acknowledged this change of the audience: the newest it has. A `remove` is
        also the point before which no member change may reach the partner any more."""
        if operation.timestamp_ms is not None:
            _, applied = self._names(operation)
            args: list[Any] = [APPLIED_TTL_SECONDS, SUBSCRIPTION_FIELD, operation.timestamp_ms]
            if operation.kind is OperationKind.AUDIENCE_DELETE:
                args += [REMOVED_FIELD, operation.timestamp_ms]
            self._record(keys=[applied], args=args)
            if operation.kind is OperationKind.AUDIENCE_DELETE and operation.message_id is not None:
                # Under the audience lock, and a remove is only sent when not older than the last
                # one applied: this is the removal REMOVED_FIELD now holds.
                self.client.hset(applied, REMOVED_ID_FIELD, operation.message_id)


def collapse_changes(changes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One change per user (by `user_key`, in order of first appearance) from one message's changes.

    The last `add` or `delete` decides membership, as the partner would end up applying them in
    order. Attribute changes go with the membership they belong to: after an `add` (or another
    attribute change) they are appended to it, so "added, then updated" becomes an `add` carrying
    the attributes; the partner ignores attribute updates of non-members, and an update sent on
    its own after the `add` was collapsed away would have left the user out. After a `delete` they
    are dropped: the user is not a member, the partner would ignore them too. Unmerged changes are
    returned as they are (the same objects), so an operation with nothing to merge keeps its key.
    """
    latest: dict[str, dict[str, Any]] = {}
    for change in changes:
        user = user_key(change["user"])
        previous = latest.get(user)
        latest[user] = change if previous is None else _merge(previous, change)
    return latest


def _merge(previous: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """`change` after `previous`, for the same user and audience in one message."""
    action = change["action"]
    if action == "delete":
        return change
    if previous["action"] == "delete":
        # An `add` after a `delete` starts over; an attribute update of a non-member is moot.
        return change if action == "add" else previous
    # add/update_attributes after add/update_attributes: an `add` anywhere makes the user a member.
    merged = dict(change, action="add" if "add" in (action, previous["action"]) else action)
    merged["timestamp_ms"] = max(previous["timestamp_ms"], change["timestamp_ms"])
    attributes = list(previous.get("attributes") or []) + list(change.get("attributes") or [])
    if attributes:
        merged["attributes"] = attributes
    return merged
