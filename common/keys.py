"""Redis key names, in one place so the web, the workers and the tools agree."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def partner_key(api_key: str) -> str:
    """Names a partner API key in Redis keys and logs without revealing it."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def inbox(self) -> str:
        """Stream of accepted messages not yet handed to a delivery task."""
        return f"{self.prefix}:inbox"

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

    def audience_lock(self, scope: str) -> str:
        """Held while one member call for an (API key, audience) is in flight."""
        return f"{self.prefix}:audlock:{scope}"

    def audience_applied(self, scope: str) -> str:
        """Hash: user -> timestamp_ms of the newest change the partner acknowledged."""
        return f"{self.prefix}:applied:{scope}"

    def suspended(self, account_id: int) -> str:
        """Set (to the API key's hash) when the partner refused that key for audiences."""
        return f"{self.prefix}:suspend:{account_id}"

    def seen(self, message_id: str) -> str:
        """Marks a message id as accepted, so a retry from mParticle is not queued twice."""
        return f"{self.prefix}:seen:{message_id}"

    def delivered(self, idempotency_key: str) -> str:
        """Marks a partner payload the partner already answered 2xx."""
        return f"{self.prefix}:delivered:{idempotency_key}"

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
