"""The interface a partner client implements.

The mapping turns each Firehose message into Operations (see workers/mapping.py) whose
payloads follow the reference contract in docs/partner-api.md. A client for another
partner API implements `send` and translates each operation kind to its own calls.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from common.keys import partner_key

# Operation kinds, stable: they go into idempotency keys.
EVENTS = "events"
AUDIENCE_UPSERT = "audience_upsert"
AUDIENCE_DELETE = "audience_delete"
MEMBERS = "members"
ERASE = "erase"


@dataclass(frozen=True)
class Operation:
    """One partner call's worth of work."""

    kind: str
    payload: dict[str, Any]
    api_key: str = field(repr=False)
    audience_id: int | None = None
    # The mParticle message this work comes from: two messages with equal content (an
    # audience added, removed and added again) are different work and need different keys.
    message_id: str | None = None

    def idempotency_key(self) -> str:
        """The same for the same work, on every attempt and every replay."""
        digest = hashlib.sha256()
        digest.update(f"{self.kind}\n{self.audience_id}\n{self.message_id}\n".encode())
        digest.update(orjson.dumps(self.payload, option=orjson.OPT_SORT_KEYS))
        return digest.hexdigest()

    def partner_key(self) -> str:
        """Names the API key in logs and Redis keys without revealing it."""
        return partner_key(self.api_key)


@dataclass(frozen=True)
class PartnerResult:
    """What the partner answered; status None when no answer came (timeout, refused)."""

    status: int | None
    retry_after: float | None = None
    error: str | None = None

    @property
    def outcome(self) -> str:
        return classify(self.status)


# mParticle's own list of retryable statuses, which is also the usual webhook practice.
TRANSIENT_STATUSES = frozenset({408, 429})


def classify(status: int | None) -> str:
    """'ok', 'transient' (retry later) or 'permanent' (dead letter now)."""
    if status is None:
        return "transient"
    if 200 <= status < 300:
        return "ok"
    if status in TRANSIENT_STATUSES or 500 <= status < 600:
        return "transient"
    return "permanent"


class PartnerClient(Protocol):
    def send(self, operation: Operation, idempotency_key: str) -> PartnerResult: ...
