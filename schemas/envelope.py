"""The light check the request path makes before a message is accepted.

Only what the service needs to answer and dedupe: the envelope and the account id.
Everything else is validated in the worker (schemas.events, schemas.audiences, schemas.dsr),
so a big batch costs the request path no more than a small one.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validates_schema

from schemas.fields import _UUID_RE, AccountSchema, LenientSchema, StrictInt, UUIDString
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
    envelope = _plain_envelope(message)
    return envelope if envelope is not None else _ENVELOPE.load(message)


def _plain_envelope(message: dict[str, Any]) -> dict[str, Any] | None:
    """What `_ENVELOPE.load(message)` returns, for a message it would take exactly as it is.

    The schema's load is the largest part of the request path's own CPU after Redis and the
    log line; nearly every message has a request type, a UUID id, an integer timestamp and an
    account with an integer id and string settings, and those the same checks, written out,
    pass in a fraction of the time. Anything else (a missing or wrong field, a setting the
    schema would coerce, a message without account or id) gives None, and the schema loads
    it itself, with its own errors: every answer, error or not, stays the schema's.
    """
    kind = message.get("type")
    message_id = message.get("id")
    account = message.get("account")
    if (
        type(kind) is not str
        or kind not in REQUEST_TYPES
        or type(message_id) is not str
        or not _UUID_RE.fullmatch(message_id)
        or type(message.get("timestamp_ms")) is not int
        or type(account) is not dict
        or type(account.get("account_id")) is not int
    ):
        return None
    if "account_settings" not in account:
        settings: dict[str, Any] | None = {}  # the schema's load_default
    else:
        settings = account["account_settings"]
        if settings is not None:
            if type(settings) is not dict:
                return None
            for value in settings.values():
                if value is not None and type(value) is not str:
                    return None  # a number or boolean the schema turns into text
            settings = dict(settings)
    return {
        "type": kind,
        "id": message_id,
        "timestamp_ms": message["timestamp_ms"],
        "account": {"account_id": account["account_id"], "account_settings": settings},
    }
