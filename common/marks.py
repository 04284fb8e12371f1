"""Marks kept per message for DEDUP_TTL_SECONDS: "this message was accepted" (seen) and "the partner
answered 2xx for this payload" (delivered), stored compactly.

A key per mark costs Redis about 120 bytes, nearly all of it per-key overhead (dict entries, the
expiry, the key's name), and every accepted message keeps two for a day. Here a mark is a 12-byte
binary digest, a field of a small hash:

    <ns><span>:<bucket>            how many bits of the digest pick the shard in this bucket
    <ns><span>:<bucket>:<shard>    hash: digest -> 1, kept under 128 fields (Redis's listpack)

`span` is DEDUP_TTL_SECONDS / SPANS_PER_TTL (rounded up); `bucket` counts spans on Redis's clock
(TIME, so hosts with skewed clocks agree). A bucket's keys all expire `ttl` after the bucket ends,
so every mark lives at least `ttl` (a lookup checks the current bucket and the SPANS_PER_TTL
before it) and on average ttl + span / 2. The first write in a bucket picks its shard bits from
the previous bucket's size (one shard's field count x its shards), aiming at FILL fields a shard:
a rate that doubles from one bucket to the next still fits listpacks; a faster jump only costs
memory (Redis converts the hash), never a mark.

Delivered marks that earlier releases wrote as one key each (`Keys.delivered`) are still found, so
an upgrade sends nothing twice; none are written any more. Seen marks of earlier releases are not
read: a retry they would have caught is stopped by the delivered mark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import redis

from common.keys import Keys, mark_digest

SPANS_PER_TTL = 4  # a lookup checks this many buckets + 1; marks live ttl x (1 + 1 / (2 x this)) on average
FILL = 64  # fields a shard aims at; Redis keeps a hash a listpack up to 128 (hash-max-listpack-entries)
MIN_BITS = 10  # a bucket with no previous one: 1,024 shards, so a fresh start at a high rate stays sane


digest = mark_digest


def span_seconds(ttl: int) -> int:
    return max(1, math.ceil(ttl / SPANS_PER_TTL))


# Lua helpers, prepended to a script that calls them. `ns` is the namespace (Keys.seen_marks or
# Keys.delivered_marks), `legacy` a per-key mark of the older layout (or false), `now` Redis's
# TIME in seconds. mark_find returns the key holding the mark, or false.
LUA = f"""
local function mark_shard(base, bucket, digest, bits)
  local x = ((digest:byte(1) * 256 + digest:byte(2)) * 256 + digest:byte(3)) * 256 + digest:byte(4)
  return base .. bucket .. ':' .. string.format('%d', x % (2 ^ tonumber(bits)))
end
local function mark_span(ttl)
  return math.max(1, math.ceil(ttl / {SPANS_PER_TTL}))
end
local function mark_find(ns, legacy, digest, ttl, now)
  if legacy and redis.call('EXISTS', legacy) == 1 then return legacy end
  local span = mark_span(ttl)
  local base = ns .. span .. ':'
  local bucket = math.floor(now / span)
  for i = 0, math.ceil(ttl / span) do
    local bits = redis.call('GET', base .. (bucket - i))
    if bits then
      local shard = mark_shard(base, bucket - i, digest, bits)
      if redis.call('HEXISTS', shard, digest) == 1 then return shard end
    end
  end
  return false
end
local function mark_add(ns, digest, ttl, now)
  local span = mark_span(ttl)
  local base = ns .. span .. ':'
  local bucket = math.floor(now / span)
  local expire_at = (bucket + 1) * span + ttl
  local bits = redis.call('GET', base .. bucket)
  if not bits then
    bits = {MIN_BITS}
    local previous = redis.call('GET', base .. (bucket - 1))
    if previous then
      local size = redis.call('HLEN', base .. (bucket - 1) .. ':0') * 2 ^ tonumber(previous)
      while bits < 32 and 2 ^ bits * {FILL} < size do bits = bits + 1 end
    end
    redis.call('SET', base .. bucket, bits, 'EXAT', expire_at)
  end
  local shard = mark_shard(base, bucket, digest, bits)
  if redis.call('HSET', shard, digest, 1) == 1 and redis.call('HLEN', shard) == 1 then
    redis.call('EXPIREAT', shard, expire_at)
  end
end
local function mark_now()
  return tonumber(redis.call('TIME')[1])
end
"""

# KEYS: the digests' one-key marks of earlier releases, if any; ARGV: ns, ttl, then the digests.
# Returns 1/0 per digest.
_EXIST = (
    LUA
    + """
local now, found = mark_now(), {}
for i = 1, #ARGV - 2 do
  found[i] = mark_find(ARGV[1], KEYS[i] or false, ARGV[2 + i], tonumber(ARGV[2]), now) and 1 or 0
end
return found
"""
)
# ARGV: ns, ttl, digests.
_ADD = (
    LUA + "local now = mark_now()\nfor i = 3, #ARGV do mark_add(ARGV[1], ARGV[i], tonumber(ARGV[2]), now) end\nreturn 1"
)
# KEYS: legacy marks; ARGV: ns, ttl, digests: removes each mark wherever it is (tests and tools).
_FORGET = (
    LUA
    + """
local now, removed = mark_now(), 0
for i = 1, #KEYS do
  while true do
    local at = mark_find(ARGV[1], KEYS[i], ARGV[2 + i], tonumber(ARGV[2]), now)
    if not at then break end
    if at == KEYS[i] then redis.call('DEL', at) else redis.call('HDEL', at, ARGV[2 + i]) end
    removed = removed + 1
  end
end
return removed
"""
)


class Marks:
    """Reads and writes the marks of one key prefix from Python (the web and the gate do it in
    their own Lua, with LUA above)."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl = ttl
        self._exist = client.register_script(_EXIST)
        self._add = client.register_script(_ADD)
        self._forget = client.register_script(_FORGET)

    def delivered(self, idempotency_keys: Sequence[str]) -> list[bool]:
        """Whether the partner answered 2xx for each payload within the TTL, in one round trip."""
        if not idempotency_keys:
            return []
        legacy = [self.keys.delivered(k) for k in idempotency_keys]
        args = [self.keys.delivered_marks, self.ttl, *(digest(k) for k in idempotency_keys)]
        return [bool(x) for x in self._exist(keys=legacy, args=args)]

    def add_delivered(self, idempotency_keys: Sequence[str]) -> None:
        if idempotency_keys:
            self._add(args=[self.keys.delivered_marks, self.ttl, *(digest(k) for k in idempotency_keys)])

    def forget_delivered(self, idempotency_keys: Sequence[str]) -> int:
        """Remove delivered marks (a test's or an operator's resend); how many were found."""
        legacy = [self.keys.delivered(k) for k in idempotency_keys]
        args = [self.keys.delivered_marks, self.ttl, *(digest(k) for k in idempotency_keys)]
        return int(self._forget(keys=legacy, args=args))

    def seen(self, message_id: str, account_id: int | str | None = None) -> bool:
        """Whether this account's message id was accepted within the TTL."""
        args = [self.keys.seen_marks, self.ttl, digest(account_id, message_id)]
        return bool(self._exist(args=args)[0])
