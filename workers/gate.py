"""The partner gate: one per partner API key, shared by every worker process on every host.

Every partner call goes through it: `enter` before the call, `leave` after, one Lua round trip
each, decided on Redis's clock (TIME) so hosts with skewed clocks agree. Nothing here waits: a
call that may not go now gets a Hold with a wait, and delivery defers the work to the retry
schedule for that long without spending an attempt.

Enter, in this order (the first that says no decides):

  a. ALREADY       the call's delivered mark exists: a twin copy of the work got through between
                   the plan's mark check and now; nothing to send.
  b. CLAIMED       another copy of the same work (same idempotency key) holds the claim: it is
                   calling the partner right now. A claim lives the partner timeout + a margin.
  c. BREAKER_OPEN  the API key's circuit breaker is open and not yet due; once due it is
                   half-open and exactly one caller becomes the probe, the others hold briefly.
  d. PAUSED        a 429 paused the API key (until its Retry-After).
  e. IN_FLIGHT     PARTNER_MAX_IN_FLIGHT_PER_KEY calls to the key are in flight (leases that
                   expire after the partner timeout + margin, so a dead worker frees its slot).
  f. RATE_LIMITED  the sliding-window rate limit (PARTNER_RATE_LIMIT) is full.
  grant            the claim, the lease and the rate-limit slot are taken together.

Leave, with what the partner answered: on 2xx the delivered marks are written in the same step
that releases the claim (so a twin can never find the claim free and the mark missing), a 429
extends the key's pause, the lease and claim are released (only if still ours) and the breaker
learns the answer: the endpoint answering (2xx, other 4xx) closes it; no answer, 408 or 5xx
counts a failure (429 is throttling, not a failure: the pause handles it). The probe failing, or
BREAKER_FAILURE_THRESHOLD failures in a row, opens it for BREAKER_COOLDOWN_SECONDS x 2^level
(capped by BREAKER_COOLDOWN_MAX_SECONDS), the level growing while the probes keep failing.

Why a Lua script rather than the `limits` library for the rate limit: the decision, the wait
until the next free slot and the other checks must be one atomic step on one clock, and the
window needs a margin on top of the period, since the partner counts calls when they arrive.
`limits` takes its time from each client and counts periods in whole seconds.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

import redis

from common import stats
from common.config import Settings
from common.keys import Keys, mark_digest
from common.marks import LUA as MARKS_LUA
from common.ratelimit import RateLimit

log = logging.getLogger(__name__)

# On top of the partner timeout for claims and leases: a call can outlast its timeout a little
# (the timeout bounds each read, not the whole answer), and a claim that expires while the call is
# still in flight would let a twin call the partner at the same time.
LEASE_MARGIN_SECONDS = 5.0
# A call held by the in-flight cap asks again this much later: calls usually end within it.
IN_FLIGHT_HOLD_MS = 500
# While the half-open probe is in flight, the others ask again this much later.
PROBE_HOLD_MS = 1000


class Hold(StrEnum):
    """A gate that said "not yet" before a call: the work is deferred without spending an attempt.

    The values are the `reason` of deferred log lines.
    """

    CLAIMED = "claimed"  # a twin copy of the same work is calling the partner right now
    BREAKER_OPEN = "breaker_open"  # the API key's endpoint keeps failing: let it recover
    PAUSED = "paused"  # the API key is paused after a 429
    IN_FLIGHT = "in_flight"  # PARTNER_MAX_IN_FLIGHT_PER_KEY calls to the API key are in flight
    RATE_LIMITED = "rate_limited"  # over the API key's rate limit
    AUDIENCE_BUSY = "audience_busy"  # another task's member call to the same audience is in flight


class CallResult(StrEnum):
    """What a granted call came to, as far as the gate is concerned (the values go to Lua)."""

    OK = "ok"  # 2xx: the marks are written, the breaker closes
    REJECTED = "rejected"  # another 4xx: the endpoint answers, so the breaker closes too
    FAILED = "failed"  # no answer, 408 or 5xx: one more failure for the breaker
    THROTTLED = "throttled"  # 429: pauses the key, says nothing about the endpoint's health
    NONE = "none"  # the client raised: no answer to learn from


class _Code(IntEnum):
    GRANTED = 0
    ALREADY = 1
    CLAIMED = 2
    BREAKER_OPEN = 3
    PAUSED = 4
    IN_FLIGHT = 5
    RATE_LIMITED = 6


_HOLDS = {
    _Code.CLAIMED: Hold.CLAIMED,
    _Code.BREAKER_OPEN: Hold.BREAKER_OPEN,
    _Code.PAUSED: Hold.PAUSED,
    _Code.IN_FLIGHT: Hold.IN_FLIGHT,
    _Code.RATE_LIMITED: Hold.RATE_LIMITED,
}

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: delivered, claim, breaker, pause, inflight, rate, breakers_open, then the delivered marks
#       of a merged call's members (ALREADY also when every one of them exists). The delivered
#       marks are named here in their older one-key form (still honoured, common/marks.py).
# ARGV: token, lease_ms, max_in_flight, rate limit (0: none), window_ms, in-flight hold ms,
#       probe hold ms, partner key hash, forget_ms, delivered marks' namespace, dedup ttl s, then
#       the digest of each delivered mark (KEYS[1], then KEYS[8]...).
# Returns {code, wait_ms, probe (1 when this caller is the half-open breaker's probe)}.
_ENTER = (
    _NOW
    + MARKS_LUA
    + """
local mark_ttl, mark_s = tonumber(ARGV[11]), math.floor(now / 1000)
if mark_find(ARGV[10], KEYS[1], ARGV[12], mark_ttl, mark_s) then
  return {1, 0, 0}
end
if #KEYS > 7 then
  local all = true
  for i = 8, #KEYS do
    if not mark_find(ARGV[10], KEYS[i], ARGV[5 + i], mark_ttl, mark_s) then all = false break end
  end
  if all then return {1, 0, 0} end
end
local token = ARGV[1]
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= token then
  return {2, math.max(1, redis.call('PTTL', KEYS[2])), 0}
end
local probe = 0
local b = redis.call('HMGET', KEYS[3], 'state', 'until', 'probe', 'probe_until')
if b[1] == 'open' or b[1] == 'half_open' then
  local due = tonumber(b[2] or '0')
  if now < due then
    return {3, due - now, 0}
  end
  local probe_until = tonumber(b[4] or '0')
  if b[3] and b[3] ~= token and probe_until > now then
    return {3, math.min(tonumber(ARGV[7]), probe_until - now), 0}
  end
  probe = 1
end
local paused_until = tonumber(redis.call('GET', KEYS[4]) or '0')
if paused_until > now then
  return {4, paused_until - now, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[3]) then
  local first = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  return {5, math.max(1, math.min(tonumber(ARGV[6]), tonumber(first[2]) - now)), 0}
end
local limit = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - window)
  if redis.call('ZCARD', KEYS[6]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
    return {6, math.max(1, tonumber(oldest[2]) + window - now), 0}
  end
  redis.call('ZADD', KEYS[6], now, token)
  redis.call('PEXPIRE', KEYS[6], window)
end
local lease = tonumber(ARGV[2])
redis.call('SET', KEYS[2], token, 'PX', lease)
redis.call('ZADD', KEYS[5], now + lease, token)
redis.call('PEXPIRE', KEYS[5], lease)
if probe == 1 then
  redis.call('HSET', KEYS[3], 'state', 'half_open', 'probe', token, 'probe_until', now + lease)
  redis.call('PEXPIRE', KEYS[3], lease + tonumber(ARGV[9]))
  redis.call('ZADD', KEYS[7], now + lease, ARGV[8])
end
return {0, 0, probe}
"""
)

# KEYS: claim, inflight, breaker, breakers_open, stats, pause.
# ARGV: token, result, failure threshold, cool-down base ms, cool-down max ms, partner key hash,
#       dedup ttl s, pause ms, stats field, forget_ms, delivered marks' namespace, then the
#       digests of the delivered marks to write (common/marks.py).
# Returns {change (0 none, 1 opened, 2 closed), failures, cool-down ms}.
_LEAVE = (
    _NOW
    + MARKS_LUA
    + """
local token = ARGV[1]
local result = ARGV[2]
if result == 'ok' then
  for i = 12, #ARGV do
    mark_add(ARGV[11], ARGV[i], tonumber(ARGV[7]), math.floor(now / 1000))
  end
end
local pause_ms = tonumber(ARGV[8])
if result == 'throttled' and pause_ms > 0 then
  -- The pause only ever extends: a shorter Retry-After seen later must not cut a longer one short.
  local until_ms = now + pause_ms
  if until_ms > tonumber(redis.call('GET', KEYS[6]) or '0') then
    redis.call('SET', KEYS[6], until_ms, 'PX', pause_ms + 1000)
  end
end
redis.call('ZREM', KEYS[2], token)
if redis.call('GET', KEYS[1]) == token then
  redis.call('DEL', KEYS[1])
end
local b = redis.call('HMGET', KEYS[3], 'state', 'failures', 'level', 'probe')
local state = b[1]
local failures = tonumber(b[2] or '0')
local is_probe = b[4] == token
local forget = tonumber(ARGV[10])
if result == 'ok' or result == 'rejected' then
  if state or failures > 0 then
    redis.call('DEL', KEYS[3])
    redis.call('ZREM', KEYS[4], ARGV[6])
    if state == 'open' or state == 'half_open' then
      return {2, failures, 0}
    end
  end
  return {0, 0, 0}
end
if result == 'failed' then
  failures = redis.call('HINCRBY', KEYS[3], 'failures', 1)
  local closed = not (state == 'open' or state == 'half_open')
  if is_probe or (closed and failures >= tonumber(ARGV[3])) then
    local level = tonumber(b[3] or '0')
    local cooldown = math.min(tonumber(ARGV[4]) * 2 ^ level, tonumber(ARGV[5]))
    cooldown = math.floor(cooldown)
    redis.call('HSET', KEYS[3], 'state', 'open', 'until', now + cooldown, 'level', level + 1)
    redis.call('HDEL', KEYS[3], 'probe', 'probe_until')
    redis.call('PEXPIRE', KEYS[3], cooldown + forget)
    -- Entries of breakers forgotten long ago (no traffic since) leave the set with them.
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - forget)
    redis.call('ZADD', KEYS[4], now + cooldown, ARGV[6])
    redis.call('HINCRBY', KEYS[5], ARGV[9], 1)
    return {1, failures, cooldown}
  end
  if closed then
    -- Failures in a row: a key that fails now and then, hours apart, never opens.
    redis.call('PEXPIRE', KEYS[3], forget)
  end
  return {0, failures, 0}
end
if is_probe then
  -- A probe that learned nothing (429, an exception): the next caller probes instead.
  redis.call('HSET', KEYS[3], 'state', 'open')
  redis.call('HDEL', KEYS[3], 'probe', 'probe_until')
end
return {0, failures, 0}
"""
)


_PAUSE = (
    _NOW
    + """
local until_ms = now + tonumber(ARGV[1])
if until_ms > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return 1
"""
)


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5
    cooldown_seconds: float = 5.0
    cooldown_max_seconds: float = 300.0


@dataclass(frozen=True)
class Ticket:
    """What `enter` said: granted (`token` set, to `leave` with), already delivered, or a hold."""

    partner_key: str
    idempotency_key: str
    token: str | None = None
    already: bool = False
    hold: Hold | None = None
    wait: float = 0.0  # seconds, for a hold
    probe: bool = False  # this call is the half-open breaker's probe

    @property
    def granted(self) -> bool:
        return self.token is not None


@dataclass(frozen=True)
class BreakerChange:
    opened: bool  # False: closed
    failures: int
    cooldown: float  # seconds, when opened


class PartnerGate:
    """The gate of every partner API key on one Redis; see the module's docstring."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        limit: RateLimit | None,
        margin_ms: int,
        lease_seconds: float,
        max_in_flight: int,
        breaker: BreakerPolicy,
        dedup_ttl_seconds: int,
    ) -> None:
        self.client = client
        self.keys = keys
        self.limit = limit
        self.window_ms = int(limit.period_seconds * 1000) + margin_ms if limit else 0
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.max_in_flight = max_in_flight
        self.breaker = breaker
        self.dedup_ttl_seconds = dedup_ttl_seconds
        self._enter = client.register_script(_ENTER)
        self._leave = client.register_script(_LEAVE)
        self._pause = client.register_script(_PAUSE)

    @classmethod
    def from_settings(cls, client: redis.Redis, keys: Keys, settings: Settings) -> PartnerGate:
        return cls(
            client,
            keys,
            limit=RateLimit.parse(settings.partner_rate_limit),
            margin_ms=settings.rate_limit_margin_ms,
            lease_seconds=settings.partner_timeout_seconds + LEASE_MARGIN_SECONDS,
            max_in_flight=settings.partner_max_in_flight_per_key,
            breaker=BreakerPolicy(
                settings.breaker_failure_threshold,
                settings.breaker_cooldown_seconds,
                settings.breaker_cooldown_max_seconds,
            ),
            dedup_ttl_seconds=settings.dedup_ttl_seconds,
        )

    def enter(self, partner_key: str, idempotency_key: str, member_marks: Sequence[str] = ()) -> Ticket:
        """May a call of this work (`idempotency_key`) to this API key go now?

        `member_marks`: the delivered marks of a merged call's members; when every one of them
        exists the call is ALREADY delivered too (other copies took each member).
        """
        token = uuid.uuid4().hex
        keys = [
            self.keys.delivered(idempotency_key),
            self.keys.claim(idempotency_key),
            self.keys.breaker(partner_key),
            self.keys.pause(partner_key),
            self.keys.inflight(partner_key),
            self.keys.rate(partner_key),
            self.keys.breakers_open,
            *(self.keys.delivered(mark) for mark in member_marks),
        ]
        args = [
            token,
            self.lease_ms,
            self.max_in_flight,
            self.limit.calls if self.limit else 0,
            self.window_ms,
            IN_FLIGHT_HOLD_MS,
            PROBE_HOLD_MS,
            partner_key,
            stats.BREAKER_FORGET_MS,
            self.keys.delivered_marks,
            self.dedup_ttl_seconds,
            mark_digest(idempotency_key),
            *(mark_digest(mark) for mark in member_marks),
        ]
        code, wait_ms, probe = (int(x) for x in self._enter(keys=keys, args=args))
        if code == _Code.GRANTED:
            return Ticket(partner_key, idempotency_key, token=token, probe=bool(probe))
        if code == _Code.ALREADY:
            return Ticket(partner_key, idempotency_key, already=True)
        return Ticket(partner_key, idempotency_key, hold=_HOLDS[_Code(code)], wait=wait_ms / 1000.0)

    def leave(
        self,
        ticket: Ticket,
        result: CallResult,
        *,
        marks: Sequence[str] = (),
        pause_seconds: float = 0.0,
    ) -> BreakerChange | None:
        """After a granted call: `marks` are written on OK, a 429 pauses the key for
        `pause_seconds`; returns the breaker's change, if it opened or closed."""
        if ticket.token is None:
            return None
        pk = ticket.partner_key
        keys = [
            self.keys.claim(ticket.idempotency_key),
            self.keys.inflight(pk),
            self.keys.breaker(pk),
            self.keys.breakers_open,
            self.keys.stats,
            self.keys.pause(pk),
        ]
        args = [
            ticket.token,
            result.value,
            self.breaker.failure_threshold,
            int(self.breaker.cooldown_seconds * 1000),
            int(self.breaker.cooldown_max_seconds * 1000),
            pk,
            self.dedup_ttl_seconds,
            int(pause_seconds * 1000),
            stats.BREAKER_OPENED,
            stats.BREAKER_FORGET_MS,
            self.keys.delivered_marks,
            *(mark_digest(mark) for mark in (marks if result is CallResult.OK else ())),
        ]
        change, failures, cooldown_ms = (int(x) for x in self._leave(keys=keys, args=args))
        if change == 0:
            return None
        event = BreakerChange(opened=change == 1, failures=failures, cooldown=cooldown_ms / 1000.0)
        # The key's hash only, never the key; bounded: one line per opening or closing.
        name = "breaker_opened" if event.opened else "breaker_closed"
        log.log(
            logging.WARNING if event.opened else logging.INFO,
            "%s partner_key=%s failures=%s cooldown=%s",
            name,
            pk,
            failures,
            event.cooldown,
            extra={"event": name, "partner_key": pk, "failures": failures, "cooldown": event.cooldown},
        )
        return event

    def pause(self, partner_key: str, seconds: float) -> None:
        """No call to this API key, from any worker, for `seconds` (what a 429 does in `leave`)."""
        if seconds > 0:
            self._pause(keys=[self.keys.pause(partner_key)], args=[int(seconds * 1000)])

    def state(self, partner_key: str) -> dict[str, str]:
        """The breaker's fields (empty: closed, no failures), for tests and tools."""
        raw = self.client.hgetall(self.keys.breaker(partner_key))
        return {k.decode(): v.decode() for k, v in raw.items()}


# Lifts an account's audience suspension only when the flag names the key that just succeeded:
# a success with another key (an older message still carrying it) says nothing about the one the
# partner refused. GET and DEL in one step, so a refusal written in between is never lost.
_LIFT_SUSPENSION = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def lift_suspension(client: redis.Redis, flag_key: str, partner_key: str) -> bool:
    """Clear the suspension flag at `flag_key` if it holds `partner_key`; True when it did."""
    return bool(client.eval(_LIFT_SUSPENSION, 1, flag_key, partner_key))
