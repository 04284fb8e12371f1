"""The retry schedule: a Redis sorted set of retries by due time.

Waits live here, not in workers: a Celery countdown over Redis sits in worker memory outside
the prefetch limit, and one longer than the broker's visibility timeout makes the message run
again. The inbox pump calls `move_due` on every turn; due retries go back into their API key's
lane atomically (removed from the schedule and added to the stream in one script), where they
take turns with other keys' messages instead of standing in front of them.
"""

from __future__ import annotations

import orjson
import redis

from common.keys import Keys
from common.names import INBOX_GROUP

_SCHEDULE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return now + tonumber(ARGV[1])
"""

# A retry that knows its lane goes straight back into it (created, with its consumer group, if
# it went away meanwhile): through the inbox it would queue behind whatever other keys' backlog
# the inbox holds, the very wait the lanes exist to prevent. One without (scheduled before lanes
# existed) goes into the inbox, and the pump's sort finds its lane. Lane keys are built here from
# the prefix (one Redis server, no cluster), as the pump's backlog count does.
_MOVE_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local lane_prefix, group = ARGV[2], ARGV[3]
for _, member in ipairs(due) do
  local entry = cjson.decode(member)
  local fields = {'body', entry['body'], 'type', entry['type'], 'id', entry['id'],
                  'attempt', tostring(entry['attempt']), 'first_seen', tostring(entry['first_seen'])}
  if type(entry['lane']) == 'string' and entry['lane'] ~= '' then
    table.insert(fields, 'lane')
    table.insert(fields, entry['lane'])
    local lane = lane_prefix .. entry['lane']
    redis.pcall('XGROUP', 'CREATE', lane, group, '0', 'MKSTREAM')
    redis.call('SADD', KEYS[3], entry['lane'])
    redis.call('XADD', lane, '*', unpack(fields))
  else
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
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
        self,
        body: str,
        *,
        message_id: str,
        message_type: str,
        attempt: int,
        first_seen_ms: int,
        delay: float,
        lane: str | None = None,
    ) -> None:
        """Run delivery attempt number `attempt` of this message after `delay` seconds.

        `lane`, when given, is the pump's lane the retry waits in (else the sort derives it
        from the body's API key again).
        """
        entry: dict[str, object] = {
            "id": message_id,
            "type": message_type,
            "attempt": attempt,
            "first_seen": first_seen_ms,
            "body": body,
        }
        if lane:
            entry["lane"] = lane
        member = orjson.dumps(entry)
        self._schedule(keys=[self.keys.retry_schedule], args=[max(0, int(delay * 1000)), member])

    def move_due(self, limit: int) -> int:
        """Move up to `limit` due retries back into their lanes (or the inbox); returns how many."""
        return int(
            self._move_due(
                keys=[self.keys.retry_schedule, self.keys.inbox, self.keys.lanes],
                args=[limit, self.keys.lane_prefix, INBOX_GROUP],
            )
        )
