"""Redis key names, in one place so the web, the workers and the tools agree."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def partner_key(api_key: str) -> str:
    """Names a partner API key in Redis keys and logs without revealing it."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def mark_digest(*parts: object) -> bytes:
    """The 12-byte BLAKE2b digest a mark kept per message is named by (common/marks.py).

    96 bits keep a false "seen" (a lost message) below 1e-11 even at 10,000 messages/s for 24 h,
    where 64 bits would not (about 2 % a day).
    """
    return hashlib.blake2b("\n".join(map(str, parts)).encode(), digest_size=12).digest()


# Counts the backlog the pump has not yet handed to Celery: the inbox and every lane. Read-only,
# one call, so a scrape or a test's "drained?" sees one consistent moment. Returns
# {entries, lanes}. Lane keys are built here from the set (one Redis server, no cluster).
BACKLOG_LUA = """
local total = redis.call('XLEN', KEYS[1])
local lanes = redis.call('SMEMBERS', KEYS[2])
for _, lane in ipairs(lanes) do
  total = total + redis.call('XLEN', ARGV[1] .. lane)
end
return {total, #lanes}
"""


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def inbox(self) -> str:
        """Stream of accepted messages not yet handed to a delivery task."""
        return f"{self.prefix}:inbox"

    @property
    def lanes(self) -> str:
        """Set of lane names that may hold entries: the pump's round visits each."""
        return f"{self.prefix}:lanes"

    @property
    def lane_prefix(self) -> str:
        return f"{self.prefix}:lane:"

    def lane_slots(self, name: str) -> str:
        """Sorted set of one lane's published tasks not yet finished (task id -> expiry ms): the
        pump publishes for a lane only while it holds fewer than PARTNER_MAX_IN_FLIGHT_PER_KEY."""
        return f"{self.prefix}:laneslots:{name}"

    @property
    def published(self) -> str:
        """Sorted set: tasks the pump published whose work has not moved on, task id -> deadline (ms)."""
        return f"{self.prefix}:published"

    def published_job(self, task_id: str) -> str:
        """Hash: what one published task carries (lane, kind, body, attempt, first_seen, id), kept
        until the task ends: the broker can lose a task it has taken off its queue (workers/pump.py)."""
        return f"{self.prefix}:pubjob:{task_id}"

    def lane(self, name: str) -> str:
        """Stream of one lane (an API key's hash, or an entry's own `lane`): sorted, not yet published."""
        return f"{self.lane_prefix}{name}"

    @property
    def retry_schedule(self) -> str:
        """Sorted set of retries by due time; the pump moves due ones back to the inbox."""
        return f"{self.prefix}:retry"

    def rate(self, partner_key: str) -> str:
        """The rate-limit window of one partner API key (named by its hash)."""
        return f"{self.prefix}:rate:{partner_key}"

    def pause(self, partner_key: str) -> str:
        """Until when (ms) one partner API key is paused after a 429 with Retry-After."""
        return f"{self.prefix}:pause:{partner_key}"

    def claim(self, idempotency_key: str) -> str:
        """Held (a token, TTL the partner timeout + a margin) while one copy of this work calls the partner."""
        return f"{self.prefix}:claim:{idempotency_key}"

    def inflight(self, partner_key: str) -> str:
        """Sorted set: the leases of the calls to one API key in flight, token -> expiry (ms)."""
        return f"{self.prefix}:inflight:{partner_key}"

    def breaker(self, partner_key: str) -> str:
        """Hash: the circuit breaker of one API key (state, failures, level, until, probe)."""
        return f"{self.prefix}:breaker:{partner_key}"

    @property
    def breakers_open(self) -> str:
        """Sorted set: hashes of the API keys whose breaker is not closed, by due time (ms)."""
        return f"{self.prefix}:breakers:open"

    def audience_lock(self, scope: str) -> str:
        """Held while one member call for an (API key, audience) is in flight."""
        return f"{self.prefix}:audlock:{scope}"

    def audience_applied(self, scope: str) -> str:
        """Hash: user -> timestamp_ms of the newest change the partner acknowledged."""
        return f"{self.prefix}:applied:{scope}"

    def suspended(self, account_id: int) -> str:
        """Set (to the API key's hash) when the partner refused that key for audiences."""
        return f"{self.prefix}:suspend:{account_id}"

    @property
    def seen_marks(self) -> str:
        """Namespace of the marks of accepted message ids (common/marks.py: bucketed hashes of
        digests of account and id). Per account: mParticle's ids are unique per account only."""
        return f"{self.prefix}:s:"

    @property
    def delivered_marks(self) -> str:
        """Namespace of the marks of payloads the partner answered 2xx (digests of their
        idempotency keys, which name the account too: every payload carries its account_id)."""
        return f"{self.prefix}:d:"

    def delivered(self, idempotency_key: str) -> str:
        """A payload's delivered mark as a key of its own, as releases before common/marks.py wrote
        it: no longer written, still read, so a payload a worker of the previous release delivered
        just before an upgrade is not sent again by the new one."""
        return f"{self.prefix}:delivered:{idempotency_key}"

    def split(self, message_id: str) -> str:
        """Marks a message as split into units (workers/units.py), so a re-run writes none again."""
        return f"{self.prefix}:split:{message_id}"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dlq"

    @property
    def dead_letter_index(self) -> str:
        return f"{self.prefix}:dlq:index"

    @property
    def skipped_events(self) -> str:
        """Hash of skipped-event counts by reason."""
        return f"{self.prefix}:stats:skipped"

    @property
    def partner_latency(self) -> str:
        """Hash: a histogram of partner call latency (see common/stats.py)."""
        return f"{self.prefix}:stats:partner_latency"

    @property
    def stats(self) -> str:
        """Hash of delivery counters (delivered, retried, dead_lettered...)."""
        return f"{self.prefix}:stats:delivery"
