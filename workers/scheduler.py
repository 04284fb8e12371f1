"""The retry schedule: a Redis sorted set of retries by due time.

Waits live here, not in workers: a Celery countdown over Redis sits in worker memory outside
the prefetch limit, and one longer than the broker's visibility timeout makes the message run
again. The inbox pump calls `move_due` on every turn; due retries go back into the inbox
stream atomically (removed from the schedule and added to the stream in one script), and from
there take the same way as new messages.
"""

from __future__ import annotations

import orjson
import redis

from common.keys import Keys

_SCHEDULE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return now + tonumber(ARGV[1])
"""

_MOVE_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local entry = cjson.decode(member)
  redis.call('XADD', KEYS[2], '*', 'body', entry['body'], 'type', entry['type'], 'id', entry['id'],
             'attempt', tostring(entry['attempt']), 'first_seen', tostring(entry['first_seen']))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


class RetrySchedule:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._schedule = client.register_script(_SCHEDULE)
        self._move_due = client.register_script(_MOVE_DUE)

    def schedule(
        self, body: str, *, message_id: str, message_type: str, attempt: int, first_seen_ms: int, delay: float
    ) -> None:
        """Run delivery attempt number `attempt` of this message after `delay` seconds."""
        member = orjson.dumps(
            {
                "id": message_id,
                "type": message_type,
                "attempt": attempt,
                "first_seen": first_seen_ms,
                "body": body,
            }
        )
        self._schedule(keys=[self.keys.retry_schedule], args=[max(0, int(delay * 1000)), member])

    def move_due(self, limit: int) -> int:
        """Move up to `limit` due retries into the inbox; returns how many."""
        return int(self._move_due(keys=[self.keys.retry_schedule, self.keys.inbox], args=[limit]))
