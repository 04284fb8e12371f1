"""Full validation of `event_processing_request` messages (protocol §6).

`parse_event_batch` is called by the Celery worker on a queued message. The
envelope and batch-level fields must be valid (else `MessageInvalid`); events are
validated one by one and a bad or unknown event is skipped and recorded in
`EventBatch.skipped` while the rest of the batch goes on (§11.4).

Valid events are returned as the ORIGINAL dicts (unknown keys kept, nothing
converted), so the mappers see exactly what mParticle sent, including int64
`session_id` values beyond 2**53.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from marshmallow import Schema, ValidationError, fields

from schemas.fields import (
    AccountSchema,
    DroppedIdentity,
    EnvelopeSchema,
    IdentitySchema,
    IdString,
    LenientSchema,
    MessageInvalid,
    SettingsMap,
    StrictBool,
    StrictInt,
    StrictNumber,
    StringList,
    UUIDString,
    check_message,
    first_error,
    load_or_invalid,
    parse_identities,
)
from schemas.messages import EVENTS

__all__ = [
    "EVENT_TYPES",
    "EventBatch",
    "MessageInvalid",
    "SkippedEvent",
    "parse_event_batch",
    "validate_event",
]

# Reason codes recorded in SkippedEvent.reason.
REASON_UNKNOWN_TYPE = "unknown_type"
REASON_INVALID_EVENT = "invalid:event"  # the list item is not a JSON object
REASON_INVALID_TYPE = "invalid:type"  # `type` missing, empty or not a string


@dataclass(frozen=True, slots=True)
class SkippedEvent:
    """One event left out of the batch, and why.

    `reason` is a low-cardinality code for counting: `unknown_type`, `invalid:event`,
    or `invalid:<field path>` such as `invalid:timestamp_ms` or
    `invalid:products.position`. `detail` is the human-readable message.
    """

    index: int
    event_id: str | None
    reason: str
    detail: str = ""


@dataclass(slots=True)
class EventBatch:
    message_id: str
    account_id: int
    account_settings: dict[str, str | None]
    timestamp_ms: int
    source_channel: str | None
    mpid: str | None
    user_identities: list[dict[str, str]]
    device_identities: list[dict[str, str]]
    partner_identities: list[dict[str, str]]
    user_attributes: dict[str, str | None]
    user_attribute_lists: dict[str, list[str | None] | None]
    runtime_environment: dict[str, Any] | None
    events: list[dict[str, Any]]
    skipped: list[SkippedEvent]
    # Beyond the brief's minimum: cheap to carry and needed by some mappers.
    dropped_identities: list[DroppedIdentity] = field(default_factory=list)
    firehose_version: str | None = None
    source_id: str | None = None
    device_application_stamp: str | None = None
    integration_attributes: dict[str, str | None] = field(default_factory=dict)
    consent_state: dict[str, Any] | None = None
    system_notifications: list[dict[str, Any]] = field(default_factory=list)
    platform_fields: dict[str, Any] | None = None


# ------------------------------------------------------------------ event schemas
# Optional fields accept JSON null as "absent": mParticle is not Jackson and may
# write nulls; the SDK's deserialiser accepts them for every non-primitive field.
# Enum-valued fields (custom_event_type, product action, …) are plain strings:
# unknown values are tolerated so a new mParticle enum value never drops data.


def _opt_str() -> fields.String:
    return fields.String(allow_none=True)


def _opt_map() -> SettingsMap:
    return SettingsMap(allow_none=True)


class LocationSchema(LenientSchema):
    latitude = StrictNumber(required=True)
    longitude = StrictNumber(required=True)
    accuracy = StrictNumber(allow_none=True)


class ProductSchema(LenientSchema):
    id = _opt_str()
    name = _opt_str()
    brand = _opt_str()
    category = _opt_str()
    variant = _opt_str()
    coupon_code = _opt_str()
    position = StrictInt(allow_none=True)  # integer here, but a string on Promotion (§6.3)
    price = StrictNumber(allow_none=True)
    quantity = StrictNumber(allow_none=True)  # decimal: 4.0 occurs
    total_amount = StrictNumber(allow_none=True)
    attributes = _opt_map()


class PromotionSchema(LenientSchema):
    id = _opt_str()
    name = _opt_str()
    creative = _opt_str()
    position = _opt_str()  # string, e.g. "top"


class ImpressionSchema(LenientSchema):
    impression_list_name = _opt_str()
    products = fields.List(fields.Nested(ProductSchema()), allow_none=True)


class EventSchema(LenientSchema):
    """Base fields of every event (§6.3). `type` is checked before dispatch."""

    id = UUIDString(required=True)
    timestamp_ms = StrictInt(required=True)
    source_id = _opt_str()
    session_id = StrictInt(allow_none=True)  # int64, may be negative / beyond 2**53
    location = fields.Nested(LocationSchema(), allow_none=True)


class SessionStartSchema(EventSchema):
    pass


class SessionEndSchema(EventSchema):
    session_length_ms = StrictInt(allow_none=True)


class CustomEventSchema(EventSchema):
    name = fields.String(required=True)
    custom_event_type = _opt_str()
    attributes = _opt_map()
    custom_flags = _opt_map()


class ScreenViewSchema(EventSchema):
    screen_name = fields.String(required=True)
    attributes = _opt_map()
    custom_flags = _opt_map()


class ErrorEventSchema(EventSchema):
    message = _opt_str()
    is_crash = StrictBool(allow_none=True)
    stack_trace = _opt_str()
    breadcrumbs = StringList(allow_none=True)
    attributes = _opt_map()


class PrivacySettingChangeSchema(EventSchema):
    setting = fields.String(required=True)
    is_enabled = StrictBool(allow_none=True)


class UserAttributeChangeSchema(EventSchema):
    added = _opt_map()
    removed = _opt_map()


class UserIdentityChangeSchema(EventSchema):
    added = fields.List(fields.Nested(IdentitySchema()), allow_none=True)
    removed = fields.List(fields.Nested(IdentitySchema()), allow_none=True)


class PushSubscriptionSchema(EventSchema):
    action = fields.String(required=True)
    token = fields.String(required=True)


class ApplicationStateTransitionSchema(EventSchema):
    application_state = fields.String(required=True)
    launch_referral = _opt_str()
    referral_application = _opt_str()
    launch_parameters = _opt_str()
    source_package = _opt_str()


class PushMessageSchema(EventSchema):
    """push_message_receipt and push_message_open."""

    payload = _opt_str()


class ProductActionSchema(EventSchema):
    action = fields.String(required=True)
    transaction_id = _opt_str()
    affiliation = _opt_str()
    currency_code = _opt_str()
    coupon_code = _opt_str()
    total_amount = StrictNumber(allow_none=True)
    tax_amount = StrictNumber(allow_none=True)
    shipping_amount = StrictNumber(allow_none=True)
    products = fields.List(fields.Nested(ProductSchema()), allow_none=True)
    attributes = _opt_map()
    custom_flags = _opt_map()


class PromotionActionSchema(EventSchema):
    action = fields.String(required=True)
    promotions = fields.List(fields.Nested(PromotionSchema()), allow_none=True)
    attributes = _opt_map()
    custom_flags = _opt_map()


class ImpressionEventSchema(EventSchema):
    impressions = fields.List(fields.Nested(ImpressionSchema()), allow_none=True)
    attributes = _opt_map()
    custom_flags = _opt_map()


class AttributionSchema(EventSchema):
    name = _opt_str()
    partner_name = _opt_str()
    publisher_name = _opt_str()
    campaign_name = _opt_str()
    attributes = _opt_map()


# One instance per type, built once at import: constructing marshmallow schemas is
# far more expensive than loading with them, and batches hold up to ~1,000 events.
_EVENT_SCHEMAS: dict[str, Schema] = {
    "session_start": SessionStartSchema(),
    "session_end": SessionEndSchema(),
    "custom_event": CustomEventSchema(),
    "screen_view": ScreenViewSchema(),
    "error": ErrorEventSchema(),
    "privacy_setting_change": PrivacySettingChangeSchema(),
    "user_attribute_change": UserAttributeChangeSchema(),
    "user_identity_change": UserIdentityChangeSchema(),
    "push_subscription": PushSubscriptionSchema(),
    "application_state_transition": ApplicationStateTransitionSchema(),
    "push_message_receipt": PushMessageSchema(),
    "push_message_open": PushMessageSchema(),
    "product_action": ProductActionSchema(),
    "promotion_action": PromotionActionSchema(),
    "impression": ImpressionEventSchema(),
    "attribution": AttributionSchema(),
}

#: The 16 event type strings of §6.3.
EVENT_TYPES: frozenset[str] = frozenset(_EVENT_SCHEMAS)


# ------------------------------------------------------------------ batch schema


class EventBatchSchema(EnvelopeSchema):
    """Batch-level fields (§6.1). Identities and events are handled separately so
    that one bad entry is dropped instead of failing the whole message."""

    account = fields.Nested(AccountSchema(), required=True)
    source_id = _opt_str()
    source_channel = _opt_str()  # unknown channel values tolerated
    mpid = IdString(allow_none=True)
    device_application_stamp = _opt_str()
    user_attributes = _opt_map()
    user_attribute_lists = fields.Dict(
        keys=fields.String(),
        values=StringList(coerce=True, allow_none=True),
        allow_none=True,
    )
    integration_attributes = _opt_map()
    runtime_environment = fields.Dict(allow_none=True)  # any runtime type; kept as sent
    consent_state = fields.Dict(allow_none=True)
    system_notifications = fields.List(fields.Dict(), allow_none=True)
    platform_fields = fields.Dict(allow_none=True)


_BATCH_SCHEMA = EventBatchSchema()


def validate_event(event: Any, index: int = 0) -> SkippedEvent | None:
    """Validate one event; return None if it is valid, else why it is skipped."""
    if not isinstance(event, dict):
        return SkippedEvent(index, None, REASON_INVALID_EVENT, "Event is not a JSON object.")
    raw_id = event.get("id")
    event_id = raw_id if isinstance(raw_id, str) else None
    event_type = event.get("type")
    if not isinstance(event_type, str) or not event_type:
        return SkippedEvent(index, event_id, REASON_INVALID_TYPE, "type: Missing or not a string.")
    schema = _EVENT_SCHEMAS.get(event_type)
    if schema is None:
        return SkippedEvent(index, event_id, REASON_UNKNOWN_TYPE, f"type: {event_type!r}")
    try:
        # The loaded copy is discarded: callers get the original dict, untouched.
        schema.load(event)
    except ValidationError as exc:
        path, detail = first_error(exc.messages)
        return SkippedEvent(index, event_id, f"invalid:{path or 'event'}", detail)
    return None


def parse_event_batch(message: dict[str, Any]) -> EventBatch:
    """Validate an `event_processing_request` and return its parts.

    Raises `MessageInvalid` for an invalid envelope/batch (bad `id`, `timestamp_ms`,
    `account`, a non-list `events` or identity list, wrongly typed batch fields).
    Unknown/invalid events are skipped and listed in `skipped`; invalid identity
    entries are dropped and listed in `dropped_identities`.
    """
    check_message(message, EVENTS)
    data = load_or_invalid(_BATCH_SCHEMA, message)

    # Missing or null `events` ≡ [] (verification and eventless batches, §1.4).
    raw_events = message.get("events")
    if raw_events is None:
        raw_events = []
    elif not isinstance(raw_events, list):
        raise MessageInvalid({"events": ["Not a valid list."]})

    runtime = data.get("runtime_environment")
    user_ids, dropped = parse_identities(message.get("user_identities"), "user_identities")
    device_ids, dropped_dev = parse_identities(
        runtime.get("identities") if runtime else None, "runtime_environment.identities"
    )
    partner_ids, dropped_partner = parse_identities(message.get("partner_identities"), "partner_identities")
    dropped += dropped_dev + dropped_partner
    if runtime is not None:
        runtime = {key: value for key, value in runtime.items() if key != "identities"}

    events: list[dict[str, Any]] = []
    skipped: list[SkippedEvent] = []
    for index, event in enumerate(raw_events):
        problem = validate_event(event, index)
        if problem is None:
            events.append(event)
        else:
            skipped.append(problem)

    account = data["account"]
    return EventBatch(
        message_id=data["id"],
        account_id=account["account_id"],
        account_settings=account.get("account_settings") or {},
        timestamp_ms=data["timestamp_ms"],
        source_channel=data.get("source_channel"),
        mpid=data.get("mpid"),
        user_identities=user_ids,
        device_identities=device_ids,
        partner_identities=partner_ids,
        user_attributes=data.get("user_attributes") or {},
        user_attribute_lists=data.get("user_attribute_lists") or {},
        runtime_environment=runtime,
        events=events,
        skipped=skipped,
        dropped_identities=dropped,
        firehose_version=data.get("firehose_version"),
        source_id=data.get("source_id"),
        device_application_stamp=data.get("device_application_stamp"),
        integration_attributes=data.get("integration_attributes") or {},
        consent_state=data.get("consent_state"),
        system_notifications=data.get("system_notifications") or [],
        platform_fields=data.get("platform_fields"),
    )
