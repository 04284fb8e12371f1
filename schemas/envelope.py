"""The light check the request path makes before a message is accepted.

Only what the service needs to answer and dedupe: the envelope and the account id.
Everything else is validated in the worker (schemas.events, schemas.audiences, schemas.dsr),
so a big batch costs the request path no more than a small one.
"""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates_schema

from schemas.messages import (
    ACCOUNTLESS_TYPES,
    ENVELOPE_OPTIONAL_TYPES,
    REQUEST_TYPES,
    RESPONSE_TYPES,
)


class StrictInteger(fields.Integer):
    """An integer that is really a JSON integer: no floats, no strings, no booleans."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class AccountSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    account_id = StrictInteger(required=True)
    # Values are checked in the worker; here only the shape that routing needs.
    account_settings = fields.Dict(keys=fields.String(), load_default=dict, allow_none=True)


class EnvelopeSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    type = fields.String(required=True)
    id = fields.UUID(load_default=None)
    timestamp_ms = StrictInteger(load_default=None)
    firehose_version = fields.String(load_default=None, allow_none=True)
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


_ENVELOPE = EnvelopeSchema()


def load_envelope(message: Any) -> dict[str, Any]:
    """The checked envelope of a parsed message; raises ValidationError."""
    if not isinstance(message, dict):
        raise ValidationError({"_schema": ["A Firehose message is a JSON object."]})
    return _ENVELOPE.load(message)
