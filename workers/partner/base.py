"""The interface a partner client implements.

The mapping turns each Firehose message into Operations (see workers/mapping.py) whose
payloads follow the reference contract in docs/partner-api.md. A client for another
partner API implements `send` and translates each operation kind to its own calls.
What a partner's answer means for the message (ok, retry, dead) is decided in
workers/delivery.py, not here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import orjson

from common.keys import partner_key


class OperationKind(StrEnum):
    """What a partner call does. The values are stable: they go into idempotency keys."""

    EVENTS = "events"
    AUDIENCE_UPSERT = "audience_upsert"
    AUDIENCE_DELETE = "audience_delete"
    MEMBERS = "members"
    ERASE = "erase"

    @property
    def is_audience(self) -> bool:
        """Audience calls are the ones mParticle can suspend a subscription for (401/403)."""
        return self in _AUDIENCE_KINDS


_AUDIENCE_KINDS = frozenset({OperationKind.AUDIENCE_UPSERT, OperationKind.AUDIENCE_DELETE, OperationKind.MEMBERS})


@dataclass(frozen=True)
class Operation:
    """One partner call's worth of work."""

    kind: OperationKind
    payload: dict[str, Any]
    api_key: str = field(repr=False)
    audience_id: int | None = None
    # The mParticle message this work comes from: two messages with equal content (an
    # audience added, removed and added again) are different work and need different keys.
    message_id: str | None = None
    # When mParticle sent the message (a subscription's order among its changes); not part of
    # the work itself, so not of its idempotency key.
    timestamp_ms: int | None = field(default=None, compare=False)

    def idempotency_key(self) -> str:
        """The same for the same work, on every attempt and every replay."""
        digest = hashlib.sha256()
        # !s: the plain value of the kind, so the keys of queued and replayed work stay the same.
        digest.update(f"{self.kind!s}\n{self.audience_id}\n{self.message_id}\n".encode())
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


class PartnerClient(Protocol):
    def send(self, operation: Operation, idempotency_key: str) -> PartnerResult: ...
