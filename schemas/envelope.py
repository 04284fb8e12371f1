"""The light check the request path makes before a message is accepted.

What the service needs to answer and dedupe (the envelope and the account id), and what the
worker could never deliver that is cheap to see here: a message with work and no apiKey, an
apiKey no HTTP header can carry, an event batch's mpid or consent_state of the wrong shape, a
subscription that is not one. All
else is validated in the worker (schemas.events, schemas.audiences, schemas.dsr), where a bad
part is skipped and counted, so a big batch costs the request path no more than a small one.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validates_schema

from schemas.audiences import parse_subscription
from schemas.events import ConsentStateSchema, PlatformFieldsSchema
from schemas.fields import (
    _UUID_RE,
    AccountSchema,
    IdString,
    LenientSchema,
    MessageInvalid,
    StrictInt,
    UUIDString,
    is_header_value,
)
from schemas.messages import (
    ACCOUNTLESS_TYPES,
    ENVELOPE_OPTIONAL_TYPES,
    EVENTS,
    MEMBERSHIP,
    REGISTRATION,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    SUBSCRIPTION,
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


class _DoorBatchSchema(LenientSchema):
    """The event batch fields whose problem fails the whole batch in the worker
    (schemas/events.py FATAL_BATCH_FIELDS, beyond the envelope): checked here instead, so such
    a batch is refused with a 400 rather than answered 2xx and dead-lettered."""

    mpid = IdString(allow_none=True)
    consent_state = fields.Nested(ConsentStateSchema(), allow_none=True)
    platform_fields = fields.Nested(PlatformFieldsSchema(), allow_none=True)
    system_notifications = fields.List(fields.Raw(), allow_none=True)


_DOOR_BATCH = _DoorBatchSchema()


def load_envelope(message: Any) -> dict[str, Any]:
    """The checked envelope of a parsed message; raises ValidationError.

    Besides the envelope, it refuses what the worker could never deliver (`_undeliverable`).
    """
    if not isinstance(message, dict):
        raise ValidationError({"_schema": ["A Firehose message is a JSON object."]})
    envelope = _plain_envelope(message)
    if envelope is None:
        envelope = _ENVELOPE.load(message)
    _undeliverable(message, envelope)
    return envelope


def _undeliverable(message: dict[str, Any], envelope: dict[str, Any]) -> None:
    """Raise ValidationError, naming the field, for a message no attempt could ever deliver.

    Answering 2xx and then dead-lettering the whole message would lose it silently; a 400 tells
    mParticle (and the customer) at once. Only checks that cost next to nothing are made here;
    the worker skips and counts the bad parts of the rest (docs/architecture.md, "Shape problems").
    """
    kind = envelope.get("type")
    settings = (envelope.get("account") or {}).get("account_settings") or {}
    api_key = settings.get("apiKey")
    if not api_key and kind != REGISTRATION and carries_work(kind, message):
        # Every partner call is authorised with it (the registration declares it required), so
        # no attempt could deliver this; verification traffic, which queues nothing, needs none.
        raise ValidationError({"account": {"account_settings": {"apiKey": [MISSING_API_KEY]}}})
    if isinstance(api_key, str) and not is_header_value(api_key):
        # It goes into the partner call's Authorization header: CR/LF, other control characters
        # or a character beyond Latin-1 cannot be sent, on this attempt or any other.
        raise ValidationError(
            {
                "account": {
                    "account_settings": {
                        "apiKey": ["Not a valid HTTP header value (control character or not Latin-1)."]
                    }
                }
            }
        )
    if kind == EVENTS:
        mpid = message.get("mpid")
        # The schema's load only when there is something to check: most batches have a plain mpid
        # and none of the other fields, and the request path's CPU is counted.
        if (mpid is None or type(mpid) is str or type(mpid) is int) and plainly_valid_batch_fields(message):
            return
        errors = _DOOR_BATCH.validate(message)
        if errors:
            raise ValidationError(errors)
    elif kind == SUBSCRIPTION:
        # A subscription is small: check all of it, as the worker will. An unknown action in
        # particular could only be guessed at (create, update or tear down the partner's list?).
        try:
            parse_subscription(message)
        except MessageInvalid as exc:
            raise ValidationError(exc.errors) from None


MISSING_API_KEY = "Missing: every partner call is authorised with the account's apiKey setting."


def carries_work(kind: Any, message: dict[str, Any]) -> bool:
    """False for verification traffic (protocol §1.4), which gets the normal answer and is not
    queued: an event batch with neither events nor system notifications, a membership change
    without user profiles. Raises ValidationError for such a list that is not one."""
    if kind == EVENTS:
        # A batch of consent notifications and no events (3.2.0 `allow_eventless_batches`) is
        # real work; only a batch with neither is verification traffic.
        return _non_empty_list(message, "events") or _non_empty_list(message, "system_notifications")
    if kind == MEMBERSHIP:
        return _non_empty_list(message, "user_profiles")
    return True


def _non_empty_list(message: dict[str, Any], field: str) -> bool:
    value = message.get(field)
    if value is not None and not isinstance(value, list):
        raise ValidationError({field: ["Not a valid list."]})
    return bool(value)


_CONSENT_TEXT = ("document", "location", "hardware_id")
_CONSENT_TIMES = ("timestamp_unixtime_ms", "timestamp")
_PLATFORM_INTS = ("mp_account_id", "workspace_id", "dataplan_version")


def plainly_valid_batch_fields(message: dict[str, Any]) -> bool:
    """True when `_DOOR_BATCH` would certainly accept the batch's consent state, platform fields
    and notifications list: plain types only, no coercion needed.

    Most 3.2.0 batches carry consent state, and the schema's validation of it costs more than the
    rest of the request path's own checks together; the schema runs only when this says no (so
    the answer, and a 400's wording, are the schema's). False may be wrong, never True.
    """
    notifications = message.get("system_notifications")
    if notifications is not None and type(notifications) is not list:
        return False
    consent = message.get("consent_state")
    if consent is not None:
        if type(consent) is not dict:
            return False
        for regulation in ("gdpr_consent_state", "ccpa_consent_state"):
            purposes = consent.get(regulation)
            if purposes is None:
                continue
            if type(purposes) is not dict:
                return False
            for purpose, record in purposes.items():
                if type(purpose) is not str or type(record) is not dict or type(record.get("consented")) is not bool:
                    return False
                if any(record.get(name) is not None and type(record[name]) is not str for name in _CONSENT_TEXT):
                    return False
                if any(record.get(name) is not None and type(record[name]) is not int for name in _CONSENT_TIMES):
                    return False
    platform = message.get("platform_fields")
    if platform is not None:
        if type(platform) is not dict:
            return False
        for name, value in platform.items():
            if value is None:
                continue
            if name in _PLATFORM_INTS:
                if type(value) is not int:
                    return False
            elif type(value) is not str:
                return False
    return True


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
