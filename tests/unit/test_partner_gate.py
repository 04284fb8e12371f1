"""The partner gate on the suite's Redis: one rate limit and one 429 pause per API key, shared by
every gate on that Redis. Windows are tens of milliseconds, so waits stay short."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from common.keys import Keys
from tests.support.worker_core import client, core_settings
from workers.ratelimit import PartnerGate, RateLimit


@pytest.fixture
def keys() -> Keys:
    return Keys(core_settings().key_prefix)


@pytest.fixture
def clients() -> Iterator[tuple[redis.Redis, redis.Redis]]:
    settings = core_settings()
    # Two connections, as two worker processes would have.
    one, two = client(settings), client(settings)
    yield one, two
    one.close()
    two.close()


def test_the_limit_holds_across_gates_on_one_redis(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    limit = RateLimit(calls=3, period_seconds=0.05)
    first, second = (PartnerGate(c, keys, limit, margin_ms=10) for c in clients)
    assert [first.acquire("k"), second.acquire("k"), first.acquire("k")] == [0.0, 0.0, 0.0]
    assert second.acquire("k") > 0 and first.acquire("k") > 0
    assert first.acquire("other") == 0.0  # each API key has its own window


def test_the_wait_is_until_the_oldest_call_leaves_the_window(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys
) -> None:
    gate = PartnerGate(clients[0], keys, RateLimit(calls=1, period_seconds=0.04), margin_ms=10)
    assert gate.acquire("k") == 0.0
    wait = gate.acquire("k")
    assert 0 < wait <= 0.05
    time.sleep(wait + 0.005)
    assert gate.acquire("k") == 0.0
    assert 0 < clients[0].pttl(keys.rate("k")) <= 50  # the window's key expires with the window


def test_a_pause_stops_every_gate_and_only_ever_extends(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    first, second = (PartnerGate(c, keys, None, margin_ms=10) for c in clients)
    first.pause("k", 2.0)
    first.pause("k", 0.05)  # a shorter Retry-After seen later does not cut the pause short
    assert 1.9 < second.acquire("k") <= 2.0
    first.pause("k", 3.0)
    assert 2.9 < second.acquire("k") <= 3.0
    assert second.acquire("other") == 0.0
    first.pause("k2", 0)  # nothing to pause for
    assert not clients[0].exists(keys.pause("k2"))


def test_a_short_pause_ends(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    gate = PartnerGate(clients[0], keys, RateLimit(calls=100, period_seconds=1), margin_ms=10)
    gate.pause("k", 0.02)
    assert gate.acquire("k") > 0
    time.sleep(0.025)
    assert gate.acquire("k") == 0.0


def test_no_limit_lets_every_call_through(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    gate = PartnerGate(clients[0], keys, RateLimit.parse("none"), margin_ms=10)
    assert all(gate.acquire("k") == 0.0 for _ in range(200))
    # Only the pause applies: whatever the window holds expires at once.
    assert clients[0].pttl(keys.rate("k")) <= 1


@pytest.mark.parametrize(
    ("text", "limit"),
    [("50/second", RateLimit(50, 1)), ("600/minute", RateLimit(600, 60)), ("5/2seconds", RateLimit(5, 2))],
)
def test_rate_limits_parse(text: str, limit: RateLimit) -> None:
    assert RateLimit.parse(text) == limit
