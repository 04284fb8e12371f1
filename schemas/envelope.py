"""The light check the request path makes before a message is accepted.

Only what the service needs to answer and dedupe: the envelope and the account id.
Everything else is validated in the worker (schemas.events, schemas.audiences, schemas.dsr),
so a big batch costs the request path no more than a small one.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validates_schema

from schemas.fields import AccountSchema, LenientSchema, StrictInt, UUIDString
from schemas.messages import (
    ACCOUNTLESS_TYPES,
    ENVELOPE_OPTIONAL_TYPES,
    REQUEST_TYPES,
    RESPONSE_TYPES,
)


class RequestEnvelopeSchema(LenientSchema):
    """Per message type: DSR messages may lack id and timestamp (the SDK's own fixture does)."""

    type = fields.String(required=True)
    id = UUIDString(load_default=None)
    timestamp_ms = StrictInt(load_default=None)
    account = fields.Nested(AccountSchema, load_default=None)

    @validates_schema
    def _per_type(self, data: dict[str, Any], **_: Any) -> None:
        kind = data.get("type")
        if kind in RESPONSE_TYPES or kind not in REQUEST_TYPES:
            return  # the caller answers these with their own error codes
        errors: dict[str, list[str]] = {}
        if kind not in ENVELOPE_OPTIONAL_TYPES:
            if data.get("id") is None:
                errors["id"] = ["Missing data for required field."]
            if data.get("timestamp_ms") is None:
                errors["timestamp_ms"] = ["Missing data for required field."]
        if kind not in ACCOUNTLESS_TYPES and data.get("account") is None:
            errors["account"] = ["Missing data for required field."]
        if errors:
            raise ValidationError(errors)


_ENVELOPE = RequestEnvelopeSchema()


def load_envelope(message: Any) -> dict[str, Any]:
    """The checked envelope of a parsed message; raises ValidationError."""
    if not isinstance(message, dict):
        raise ValidationError({"_schema": ["A Firehose message is a JSON object."]})
    return _ENVELOPE.load(message)
