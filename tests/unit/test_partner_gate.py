"""The partner gate on the suite's Redis: one gate per API key, shared by every gate object on that
Redis (as by every worker process). Its checks in order (already delivered, claimed, breaker,
429 pause, in-flight cap, rate limit), the grant, and the circuit breaker's states. Windows,
leases and cool-downs are tens of milliseconds, so waits stay short."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest

from common import stats
from common.config import Settings
from common.keys import Keys
from common.marks import Marks
from service.metrics import RedisCollector
from tests.support.metrics import value
from tests.support.worker_core import client, core_settings
from workers.gate import IN_FLIGHT_HOLD_MS, PROBE_HOLD_MS, BreakerPolicy, CallResult, Hold, PartnerGate, Ticket
from workers.ratelimit import RateLimit

PK = "0123456789abcdef"  # a partner key hash, as delivery passes it


@pytest.fixture
def settings() -> Settings:
    return core_settings()


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


@pytest.fixture
def clients(settings: Settings) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    # Two connections, as two worker processes would have.
    one, two = client(settings), client(settings)
    yield one, two
    one.close()
    two.close()


def _gate(
    c: redis.Redis,
    keys: Keys,
    *,
    limit: RateLimit | None = None,
    in_flight: int = 100,
    lease: float = 5.0,
    threshold: int = 3,
    cooldown: float = 0.02,
    cooldown_max: float = 0.08,
) -> PartnerGate:
    return PartnerGate(
        c,
        keys,
        limit=limit,
        margin_ms=10,
        lease_seconds=lease,
        max_in_flight=in_flight,
        breaker=BreakerPolicy(threshold, cooldown, cooldown_max),
        dedup_ttl_seconds=60,
    )


def _granted(gate: PartnerGate, work: str, pk: str = PK) -> Ticket:
    ticket = gate.enter(pk, work)
    assert ticket.granted, ticket
    return ticket


def _fail(gate: PartnerGate, times: int, pk: str = PK) -> None:
    for i in range(times):
        gate.leave(_granted(gate, f"fail-{time.monotonic_ns()}-{i}", pk), CallResult.FAILED)


# ---------------------------------------------------------------- enter: every check, in order


def test_enter_checks_in_order_then_grants(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    c = clients[0]
    gate = _gate(c, keys, limit=RateLimit(2, 10), in_flight=2, threshold=1, cooldown=10, cooldown_max=10)
    # Every reason to say no at once: a failure opened the breaker, another call holds a lease
    # and the second rate-limit slot, a 429 paused the key, a twin claims the work, and its mark
    # is written.
    other = _granted(gate, "other")
    gate.leave(_granted(gate, "failing"), CallResult.FAILED)
    gate.max_in_flight = 1
    gate.pause(PK, 10)
    c.set(keys.claim("work"), "a-twin", px=5000)
    c.set(keys.delivered("work"), 1)

    def enter() -> Ticket:
        return gate.enter(PK, "work")

    assert enter().already
    c.delete(keys.delivered("work"))
    held = enter()
    assert held.hold is Hold.CLAIMED and 4.9 < held.wait <= 5.0
    c.delete(keys.claim("work"))
    held = enter()
    assert held.hold is Hold.BREAKER_OPEN and 9.9 < held.wait <= 10.0
    c.delete(keys.breaker(PK))
    held = enter()
    assert held.hold is Hold.PAUSED and 9.9 < held.wait <= 10.0
    c.delete(keys.pause(PK))
    held = enter()
    assert held.hold is Hold.IN_FLIGHT and 0 < held.wait <= IN_FLIGHT_HOLD_MS / 1000
    gate.leave(other, CallResult.OK)
    held = enter()
    assert held.hold is Hold.RATE_LIMITED and 9.9 < held.wait <= 10.01
    c.delete(keys.rate(PK))
    # Held calls took nothing: no claim, no lease, no slot.
    assert not c.exists(keys.claim("work")) and c.zcard(keys.inflight(PK)) == 0
    ticket = enter()
    assert ticket.granted and not ticket.probe and ticket.hold is None
    # The grant took the claim, the lease and the rate-limit slot together.
    assert c.get(keys.claim("work")) == ticket.token.encode()  # type: ignore[union-attr]
    assert c.zrange(keys.inflight(PK), 0, -1) == [ticket.token.encode()]  # type: ignore[union-attr]
    assert c.zcard(keys.rate(PK)) == 1
    assert 4000 < c.pttl(keys.claim("work")) <= 5000 and 4000 < c.pttl(keys.inflight(PK)) <= 5000


def test_leave_writes_the_marks_and_lets_go_of_claim_and_lease(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys
) -> None:
    c = clients[0]
    gate = _gate(c, keys)
    ticket = _granted(gate, "merged")
    assert gate.leave(ticket, CallResult.OK, marks=["member-1", "member-2", "merged"]) is None
    assert Marks(c, keys, 60).delivered(["member-1", "member-2", "merged"]) == [True] * 3
    assert not c.exists(keys.claim("merged")) and c.zcard(keys.inflight(PK)) == 0
    assert gate.enter(PK, "merged").already
    # A failed call writes no mark; its claim and lease go all the same.
    failed = _granted(gate, "w2")
    gate.leave(failed, CallResult.FAILED, marks=["w2"])
    assert not c.exists(keys.delivered("w2")) and not c.exists(keys.claim("w2")) and c.zcard(keys.inflight(PK)) == 0


def test_a_merged_call_is_already_delivered_when_each_member_is(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys
) -> None:
    c = clients[0]
    gate = _gate(c, keys)
    c.set(keys.delivered("m1"), 1)
    assert gate.enter(PK, "merged", ["m1", "m2"]).granted  # one member is still missing
    c.set(keys.delivered("m2"), 1)
    assert gate.enter(PK, "merged-again", ["m1", "m2"]).already


def test_two_gates_share_the_cap_and_the_claims(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    first, second = (_gate(c, keys, in_flight=2) for c in clients)
    w1 = _granted(first, "w1")
    held = second.enter(PK, "w1")
    assert held.hold is Hold.CLAIMED and held.wait > 4
    w2 = _granted(second, "w2")
    assert first.enter(PK, "w3").hold is Hold.IN_FLIGHT
    assert _granted(first, "x1", pk="fedcba9876543210")  # each API key has its own cap
    first.leave(w1, CallResult.OK, marks=["w1"])
    assert second.enter(PK, "w1").already  # the twin finds the work delivered, not free
    w3 = _granted(second, "w3")
    assert first.enter(PK, "w4").hold is Hold.IN_FLIGHT
    second.leave(w2, CallResult.OK)
    second.leave(w3, CallResult.OK)
    assert _granted(first, "w4")


def test_an_expired_lease_frees_the_cap_and_its_claim(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    c = clients[0]
    gate = _gate(c, keys, in_flight=1, lease=0.03)
    dead = _granted(gate, "w1")  # its worker dies mid-call: it never leaves
    held = gate.enter(PK, "w2")
    assert held.hold is Hold.IN_FLIGHT and 0 < held.wait <= 0.03  # no later than the lease's end
    time.sleep(0.04)
    again = _granted(gate, "w1")  # the claim expired with the lease
    # The dead call's leave, coming late, takes neither the new claim nor the new lease.
    gate.leave(dead, CallResult.NONE)
    assert c.get(keys.claim("w1")) == again.token.encode()  # type: ignore[union-attr]
    assert gate.enter(PK, "w2").hold is Hold.IN_FLIGHT


def test_the_rate_limit_holds_across_gates(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    limit = RateLimit(calls=3, period_seconds=0.05)
    first, second = (_gate(c, keys, limit=limit) for c in clients)
    assert [first.enter(PK, "a").granted, second.enter(PK, "b").granted, first.enter(PK, "c").granted] == [True] * 3
    held = second.enter(PK, "d")
    assert held.hold is Hold.RATE_LIMITED and 0 < held.wait <= 0.06
    assert first.enter("other-key-hash", "e").granted


def test_the_rate_wait_is_until_the_oldest_call_leaves_the_window(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys
) -> None:
    c = clients[0]
    gate = _gate(c, keys, limit=RateLimit(calls=1, period_seconds=0.04))
    assert gate.enter(PK, "a").granted
    held = gate.enter(PK, "b")
    assert held.hold is Hold.RATE_LIMITED and 0 < held.wait <= 0.05
    time.sleep(held.wait + 0.005)
    assert gate.enter(PK, "b").granted
    assert 0 < c.pttl(keys.rate(PK)) <= 50  # the window's key expires with the window


def test_no_rate_limit_keeps_no_window(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    c = clients[0]
    gate = _gate(c, keys, limit=RateLimit.parse("none"))
    for i in range(50):
        gate.leave(_granted(gate, f"w{i}"), CallResult.OK)
    assert not c.exists(keys.rate(PK))


def test_a_pause_stops_every_gate_and_only_ever_extends(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    first, second = (_gate(c, keys) for c in clients)
    first.pause(PK, 2.0)
    first.pause(PK, 0.05)  # a shorter Retry-After seen later does not cut the pause short
    held = second.enter(PK, "a")
    assert held.hold is Hold.PAUSED and 1.9 < held.wait <= 2.0
    # A 429 as a call leaves extends it the same way.
    second.leave(_granted(second, "b", pk="fedcba9876543210"), CallResult.THROTTLED, pause_seconds=3.0)
    assert 2.9 < first.enter("fedcba9876543210", "c").wait <= 3.0
    first.pause("k2", 0)  # nothing to pause for
    assert not clients[0].exists(keys.pause("k2"))


def test_a_short_pause_ends(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    gate = _gate(clients[0], keys)
    gate.pause(PK, 0.02)
    assert gate.enter(PK, "a").hold is Hold.PAUSED
    time.sleep(0.025)
    assert gate.enter(PK, "a").granted


@pytest.mark.parametrize(
    ("text", "limit"),
    [("50/second", RateLimit(50, 1)), ("600/minute", RateLimit(600, 60)), ("5/2seconds", RateLimit(5, 2))],
)
def test_rate_limits_parse(text: str, limit: RateLimit) -> None:
    assert RateLimit.parse(text) == limit


# ---------------------------------------------------------------- the circuit breaker


def test_the_breaker_opens_after_n_transient_failures(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    c = clients[0]
    gate = _gate(c, keys, threshold=3, cooldown=0.02)
    _fail(gate, 2)
    assert gate.state(PK) == {"failures": "2"} and gate.enter(PK, "w").granted
    with caplog.at_level(logging.INFO, logger="workers.gate"):
        change = gate.leave(_granted(gate, "third"), CallResult.FAILED)
    assert change is not None and change.opened and change.failures == 3 and change.cooldown == 0.02
    held = gate.enter(PK, "later")
    assert held.hold is Hold.BREAKER_OPEN and 0 < held.wait <= 0.02
    assert c.zrange(keys.breakers_open, 0, -1) == [PK.encode()]
    assert int(c.hget(keys.stats, stats.BREAKER_OPENED) or 0) == 1
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "breaker_opened"]
    assert (record.partner_key, record.failures, record.cooldown) == (PK, 3, 0.02)  # type: ignore[attr-defined]
    assert gate.enter("fedcba9876543210", "other key").granted  # one key's breaker, not everyone's


def test_429_is_no_failure_and_the_endpoint_answering_resets_the_count(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys
) -> None:
    gate = _gate(clients[0], keys, threshold=3)
    for i in range(5):
        gate.leave(_granted(gate, f"throttled-{i}"), CallResult.THROTTLED)
    assert gate.state(PK) == {}
    _fail(gate, 2)
    gate.leave(_granted(gate, "rejected"), CallResult.REJECTED)  # a 400: the endpoint answers
    assert gate.state(PK) == {}
    _fail(gate, 2)
    gate.leave(_granted(gate, "ok"), CallResult.OK)
    _fail(gate, 2)
    assert gate.enter(PK, "still closed").granted
    # No answer to learn from (the client raised): neither a failure nor a success.
    gate.leave(_granted(gate, "raised"), CallResult.NONE)
    assert gate.state(PK) == {"failures": "2"}
    assert 0 < clients[0].pttl(keys.breaker(PK)) <= stats.BREAKER_FORGET_MS  # failures in a row, not for ever


def test_half_open_lets_one_probe_through_and_its_success_closes(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    c = clients[0]
    first, second = (_gate(cl, keys, threshold=1, cooldown=0.02) for cl in clients)
    _fail(first, 1)
    time.sleep(0.03)
    probe = first.enter(PK, "probe")
    assert probe.granted and probe.probe and first.state(PK)["state"] == "half_open"
    for gate in (first, second):
        held = gate.enter(PK, "another")
        assert held.hold is Hold.BREAKER_OPEN and 0.9 < held.wait <= PROBE_HOLD_MS / 1000
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="workers.gate"):
        change = first.leave(probe, CallResult.OK)
    assert change is not None and not change.opened
    assert [r.event for r in caplog.records if hasattr(r, "event")] == ["breaker_closed"]  # type: ignore[attr-defined]
    assert first.state(PK) == {} and c.zcard(keys.breakers_open) == 0
    assert second.enter(PK, "another").granted


def test_a_failed_probe_reopens_for_longer_up_to_the_cap(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    c = clients[0]
    gate = _gate(c, keys, threshold=1, cooldown=0.01, cooldown_max=0.03)
    _fail(gate, 1)
    cooldowns: list[float] = []
    for _ in range(3):
        time.sleep(0.035)
        probe = gate.enter(PK, f"probe-{time.monotonic_ns()}")
        assert probe.probe
        change = gate.leave(probe, CallResult.FAILED)
        assert change is not None and change.opened
        cooldowns.append(change.cooldown)
        assert gate.enter(PK, "held").hold is Hold.BREAKER_OPEN
    assert cooldowns == [0.02, 0.03, 0.03]  # 10 ms x 2^level, capped
    assert int(c.hget(keys.stats, stats.BREAKER_OPENED) or 0) == 4
    # Once the probe gets an answer, the level starts again from the bottom.
    time.sleep(0.035)
    gate.leave(gate.enter(PK, "probe-ok"), CallResult.OK)
    change = gate.leave(_granted(gate, "fails again"), CallResult.FAILED)
    assert change is not None and change.cooldown == 0.01


def test_a_probe_that_learned_nothing_lets_the_next_caller_probe(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys
) -> None:
    gate = _gate(clients[0], keys, threshold=1, cooldown=0.01)
    _fail(gate, 1)
    time.sleep(0.015)
    probe = gate.enter(PK, "probe")
    assert probe.probe
    assert gate.leave(probe, CallResult.THROTTLED) is None  # a 429: says nothing of the endpoint
    again = gate.enter(PK, "next")
    assert again.granted and again.probe


def test_a_dead_probe_is_replaced_after_its_lease(clients: tuple[redis.Redis, redis.Redis], keys: Keys) -> None:
    gate = _gate(clients[0], keys, threshold=1, cooldown=0.01, lease=0.03)
    _fail(gate, 1)
    time.sleep(0.015)
    assert gate.enter(PK, "probe").probe  # its worker dies: it never leaves
    held = gate.enter(PK, "next")
    assert held.hold is Hold.BREAKER_OPEN and held.wait <= 0.03
    time.sleep(0.035)
    assert gate.enter(PK, "next").probe


def test_open_breakers_are_a_gauge_and_openings_a_counter(
    clients: tuple[redis.Redis, redis.Redis], keys: Keys, settings: Settings
) -> None:
    c = clients[0]
    gate = _gate(c, keys, threshold=1, cooldown=0.01)
    for pk in ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc"):
        _fail(gate, 1, pk=pk)
    time.sleep(0.015)
    gate.leave(gate.enter("cccccccccccccccc", "probe"), CallResult.OK)
    # A breaker forgotten long ago (no call since) is not counted, whatever the set still holds.
    c.zadd(keys.breakers_open, {"dddddddddddddddd": time.time() * 1000 - stats.BREAKER_FORGET_MS - 60_000})

    text = _scrape(settings)
    assert value(text, "firehose_partner_breakers_open") == 2
    assert value(text, "firehose_partner_breaker_openings_total") == 3
    # One series each, whatever the number of keys: no API key (or hash) in a label.
    assert "aaaaaaaaaaaaaaaa" not in text and "partner_key" not in text


def _scrape(settings: Settings) -> str:
    collector = RedisCollector(settings)

    class _Only:
        def collect(self) -> Any:
            return collector.collect()

    return generate_latest(_Only()).decode()  # type: ignore[arg-type]
