"""The partner gate: one rate limit and one 429 pause per partner API key, shared by every
worker process on every host through Redis.

Why a small Lua script rather than the `limits` library: the decision, the wait until the
next free slot and the pause check must be one atomic step on one clock (Redis's TIME, so
hosts with skewed clocks agree), and the window needs a margin of milliseconds on top of the
period, since the partner counts calls when they arrive, a little after we decide. `limits`
takes its time from each client and counts periods in whole seconds.
"""

from __future__ import annotations

import uuid

import redis

from common.keys import Keys

# Parsed in common/ so Settings can check PARTNER_RATE_LIMIT at start; importable from here as before.
from common.ratelimit import RateLimit

# A sliding-window log: the window holds the decision times of the last `limit` calls.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused_until = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused_until > now then
  return paused_until - now
end
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""

# The pause only ever extends: a shorter Retry-After seen later must not cut a longer one short.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
  return until_ms
end
return current
"""


class PartnerGate:
    def __init__(self, client: redis.Redis, keys: Keys, limit: RateLimit | None, margin_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.limit = limit
        self.window_ms = int(limit.period_seconds * 1000) + margin_ms if limit else 0
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)

    def acquire(self, partner_key: str) -> float:
        """0 when a call may go now (its slot is taken); else seconds to wait before asking again."""
        if self.limit is None:
            limit, window = 2**31, 1  # only the pause applies
        else:
            limit, window = self.limit.calls, self.window_ms
        wait_ms = self._acquire(
            keys=[self.keys.rate(partner_key), self.keys.pause(partner_key)],
            args=[limit, window, uuid.uuid4().hex],
        )
        return int(wait_ms) / 1000.0

    def pause(self, partner_key: str, seconds: float) -> None:
        """No call to this API key, from any worker, for `seconds`."""
        if seconds > 0:
            self._pause(keys=[self.keys.pause(partner_key)], args=[int(seconds * 1000)])
