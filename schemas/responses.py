"""Response messages sent back to mParticle."""

from __future__ import annotations

import time
import uuid
from typing import Any

from marshmallow import Schema, fields

from schemas.messages import FIREHOSE_VERSION


class ResponseEnvelopeSchema(Schema):
    """Every response carries these four fields."""

    type = fields.String(required=True)
    id = fields.UUID(required=True)
    timestamp_ms = fields.Integer(required=True)
    firehose_version = fields.String(required=True)


class EventProcessingResponseSchema(ResponseEnvelopeSchema):
    pass


class AudienceSubscriptionResponseSchema(ResponseEnvelopeSchema):
    audience_subscription_settings = fields.Dict(keys=fields.String(), values=fields.String())


class AudienceMembershipChangeResponseSchema(ResponseEnvelopeSchema):
    suspend_subscription = fields.Boolean()


class DsrProcessingResponseSchema(ResponseEnvelopeSchema):
    pass


def response_envelope(response_type: str, **extra: Any) -> dict[str, Any]:
    """A response message; like the SDK, each one gets a fresh id (protocol spec §11.2)."""
    return {
        "type": response_type,
        "id": str(uuid.uuid4()),
        "timestamp_ms": time.time_ns() // 1_000_000,
        "firehose_version": FIREHOSE_VERSION,
        **extra,
    }
