"""Keeping audience membership convergent at the partner.

mParticle retries, workers run in parallel and the partner fails at times, so an `add` sent
before a `delete` could otherwise be acknowledged after it. Two rules prevent that:

1. One member call per (partner API key, audience) in flight at a time: a lock in Redis.
   With calls serialised, the partner acknowledges them in the order we send them.
2. Under that lock, a change older than (or as old as) the newest change the partner already
   acknowledged for the same user and audience is dropped before sending: the `applied` hash
   keeps, per user, the `timestamp_ms` of the last acknowledged change.

So the sequence the partner applies only ever moves each user forward in time, and ends in
the state of the newest change mParticle sent.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from common.keys import Keys
from workers.partner.base import Operation

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


class AudienceGuard:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        lock_ttl_seconds: float,
        busy_wait_seconds: float = 1.0,
        poll_seconds: float = 0.05,
    ) -> None:
        self.client = client
        self.keys = keys
        self.lock_ttl_ms = int(lock_ttl_seconds * 1000)
        # Another task's member call to the same audience usually ends within a second; waiting
        # longer would park a worker, so past this the delivery is deferred instead.
        self.busy_wait_seconds = busy_wait_seconds
        self.poll_seconds = poll_seconds
        self._release = client.register_script(_RELEASE)
        self._record = client.register_script(_RECORD)

    def _names(self, operation: Operation) -> tuple[str, str]:
        scope = f"{operation.partner_key()}:{operation.audience_id}"
        return self.keys.audience_lock(scope), self.keys.audience_applied(scope)

    @contextmanager
    def locked(self, operation: Operation) -> Iterator[bool]:
        """Yields True while this task holds the audience's lock; False if another one held it
        for the whole of `busy_wait_seconds`."""
        lock, _ = self._names(operation)
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.busy_wait_seconds
        held = bool(self.client.set(lock, token, nx=True, px=self.lock_ttl_ms))
        while not held and time.monotonic() < deadline:
            time.sleep(self.poll_seconds)
            held = bool(self.client.set(lock, token, nx=True, px=self.lock_ttl_ms))
        try:
            yield held
        finally:
            if held:
                self._release(keys=[lock], args=[token])

    def fresh_changes(self, operation: Operation) -> Operation | None:
        """The operation without the changes the partner already has something newer for."""
        _, applied = self._names(operation)
        latest: dict[str, dict[str, Any]] = {}
        for change in operation.payload["changes"]:
            # Within one message, the last change for a user is the one that counts.
            latest[user_key(change["user"])] = change
        users = list(latest)
        seen = self.client.hmget(applied, users) if users else []
        fresh = [
            change
            for user, change, ts in zip(users, latest.values(), seen, strict=True)
            if ts is None or change["timestamp_ms"] > int(ts)
        ]
        if not fresh:
            return None
        if len(fresh) == len(operation.payload["changes"]):
            return operation
        payload = dict(operation.payload, changes=fresh)
        return dataclasses.replace(operation, payload=payload)

    def record(self, operation: Operation) -> None:
        """The partner acknowledged these changes: they are the newest it has for these users."""
        _, applied = self._names(operation)
        args: list[Any] = [APPLIED_TTL_SECONDS]
        for change in operation.payload["changes"]:
            args += [user_key(change["user"]), change["timestamp_ms"]]
        self._record(keys=[applied], args=args)
