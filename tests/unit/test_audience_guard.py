"""The audience guard on the suite's Redis: one member call per audience at a time, stale
changes dropped, and the record of what the partner has only moving forward."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from common.keys import Keys
from tests.support.worker_core import client, core_settings
from workers.audiences import AudienceGuard, user_key
from workers.partner.base import Operation, OperationKind


@pytest.fixture
def redis_conn() -> Iterator[redis.Redis]:
    c = client(core_settings())
    yield c
    c.close()


@pytest.fixture
def keys() -> Keys:
    return Keys(core_settings().key_prefix)


def _guard(c: redis.Redis, keys: Keys, ttl: float = 5.0) -> AudienceGuard:
    return AudienceGuard(c, keys, lock_ttl_seconds=ttl)


def _change(mpid: str, ts: int, action: str = "add") -> dict[str, Any]:
    return {"action": action, "timestamp_ms": ts, "user": {"mpid": mpid}}


def _members(*changes: dict[str, Any], audience: int = 7, api_key: str = "k") -> Operation:
    return Operation(OperationKind.MEMBERS, {"account_id": 1, "changes": list(changes)}, api_key, audience, "m")


def test_one_holder_per_audience(redis_conn: redis.Redis, keys: Keys) -> None:
    guard = _guard(redis_conn, keys)
    op = _members(_change("u1", 1))
    with guard.locked(op) as first:
        assert first
        with guard.locked(op) as second:
            assert not second
        with guard.locked(_members(_change("u1", 1), audience=8)) as other_audience:
            assert other_audience
        with guard.locked(_members(_change("u1", 1), api_key="k2")) as other_key:
            assert other_key
    with guard.locked(op) as after:
        assert after


def test_a_busy_audience_is_answered_at_once_with_when_to_ask_again(redis_conn: redis.Redis, keys: Keys) -> None:
    op = _members(_change("u1", 1))
    with _guard(redis_conn, keys, ttl=0.2).locked(op):
        started = time.monotonic()
        with _guard(redis_conn, keys).locked(op) as busy:
            # No waiting for the holder: a waiting task would hold a worker slot.
            assert not busy and time.monotonic() - started < 0.05
            assert 0.1 < busy.wait <= 0.2  # the lock's remaining TTL...
    with _guard(redis_conn, keys, ttl=60).locked(op), _guard(redis_conn, keys).locked(op) as busy:
        assert not busy and busy.wait == AudienceGuard.busy_wait_max_seconds  # ...capped
    with _guard(redis_conn, keys).locked(op) as free:
        assert free  # released by its holder


def test_an_expired_lock_is_not_released_by_its_old_holder(redis_conn: redis.Redis, keys: Keys) -> None:
    slow = _guard(redis_conn, keys, ttl=0.01)
    other = _guard(redis_conn, keys)
    op = _members(_change("u1", 1))
    lock = keys.audience_lock(f"{op.partner_key()}:7")
    slow_hold = slow.locked(op)
    assert slow_hold.__enter__()
    time.sleep(0.02)  # the slow holder's lock expired
    with other.locked(op) as taken:
        assert taken
        token = redis_conn.get(lock)
        slow_hold.__exit__(None, None, None)  # the slow holder leaves after the other took the lock
        assert token is not None and redis_conn.get(lock) == token
    assert not redis_conn.exists(lock)


def test_stale_changes_are_dropped(redis_conn: redis.Redis, keys: Keys) -> None:
    guard = _guard(redis_conn, keys)
    guard.record(_members(_change("u1", 100), _change("u2", 100)))
    # Strictly older only: a change as old as the acknowledged one is sent (arrival order decides).
    op = _members(_change("u1", 99, "delete"), _change("u2", 101, "delete"), _change("u3", 5))
    fresh = guard.fresh_changes(op)
    assert fresh is not None
    assert [(c["user"]["mpid"], c["timestamp_ms"]) for c in fresh.payload["changes"]] == [("u2", 101), ("u3", 5)]
    assert (fresh.kind, fresh.audience_id, fresh.message_id) == (op.kind, op.audience_id, op.message_id)
    assert guard.fresh_changes(_members(_change("u1", 99), _change("u2", 99))) is None
    whole = _members(_change("u4", 1))
    assert guard.fresh_changes(whole) is whole  # nothing dropped: the very same operation (and key)


def test_within_one_message_the_last_change_for_a_user_counts(redis_conn: redis.Redis, keys: Keys) -> None:
    guard = _guard(redis_conn, keys)
    fresh = guard.fresh_changes(_members(_change("u1", 10, "add"), _change("u1", 10, "delete")))
    assert fresh is not None and [c["action"] for c in fresh.payload["changes"]] == ["delete"]


def test_the_record_never_moves_backwards(redis_conn: redis.Redis, keys: Keys) -> None:
    guard = _guard(redis_conn, keys)
    guard.record(_members(_change("u1", 200)))
    guard.record(_members(_change("u1", 100), _change("u2", 50)))
    applied = keys.audience_applied(f"{_members().partner_key()}:7")
    # The audience's newest member change too (what a late `remove` is compared with).
    assert redis_conn.hgetall(applied) == {b"mpid:u1": b"200", b"mpid:u2": b"50", b"subscription:members": b"200"}
    assert redis_conn.ttl(applied) > 0


def test_user_keys() -> None:
    assert user_key({"mpid": 5}) == "mpid:5"
    assert user_key({"user_identities": [{"type": "email", "value": "a@b"}]}) == "user_identities:email:a@b"
    assert user_key({}) == "anonymous"
