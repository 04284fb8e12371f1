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
    prune_settings_map,
    prune_string_lists,
    with_coercions,
)
from schemas.messages import EVENTS

__all__ = [
    "EVENT_TYPES",
    "NOTIFICATION_TYPES",
    "EventBatch",
    "MessageInvalid",
    "SkippedEvent",
    "parse_event_batch",
    "validate_event",
    "validate_notification",
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
    # The valid notifications, as the ORIGINAL dicts (like events); a bad or unknown one is
    # left out and listed in `skipped_notifications` instead of failing the batch.
    system_notifications: list[dict[str, Any]] = field(default_factory=list)
    platform_fields: dict[str, Any] | None = None
    skipped_notifications: list[SkippedEvent] = field(default_factory=list)
    # Reason codes (`invalid:<field>`) of batch fields, or their entries, left out for their
    # shape (a list inside user_attributes, a numeric source_channel): counted, never fatal.
    dropped_fields: list[str] = field(default_factory=list)


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
    position = StrictInt(allow_none=True, coerce_strings=True)  # integer here, but a string on Promotion (§6.3)
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
    # Event numbers take numeric strings as the SDK does (exact ints, schemas/fields.py).
    timestamp_ms = StrictInt(required=True, coerce_strings=True)
    source_id = _opt_str()
    session_id = StrictInt(allow_none=True, coerce_strings=True)  # int64, may be negative / beyond 2**53
    location = fields.Nested(LocationSchema(), allow_none=True)


class SessionStartSchema(EventSchema):
    pass


class SessionEndSchema(EventSchema):
    session_length_ms = StrictInt(allow_none=True, coerce_strings=True)


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


# ------------------------------------------------------------------ consent and notifications


class ConsentRecordSchema(LenientSchema):
    """GDPRConsent / CCPAConsent (§3.4): the same shape for both regulations."""

    consented = StrictBool(required=True)  # a record without a decision says nothing a partner can act on
    document = _opt_str()
    timestamp_unixtime_ms = StrictInt(allow_none=True)
    timestamp = StrictInt(allow_none=True)  # the same field's name before SDK 1.10
    location = _opt_str()  # free text, not a Location object
    hardware_id = _opt_str()


def _consent_map() -> fields.Dict:
    """purpose → consent record; purposes are the customer's own strings."""
    return fields.Dict(keys=fields.String(), values=fields.Nested(ConsentRecordSchema()), allow_none=True)


class ConsentStateSchema(LenientSchema):
    gdpr_consent_state = _consent_map()
    ccpa_consent_state = _consent_map()


class GdprNotificationSchema(LenientSchema):
    purpose = fields.String(required=True)
    old_gdpr_consent_state = fields.Nested(ConsentRecordSchema(), allow_none=True)
    new_gdpr_consent_state = fields.Nested(ConsentRecordSchema(), allow_none=True)


class CcpaNotificationSchema(LenientSchema):
    purpose = _opt_str()  # the SDK defaults it to data_sale_opt_out
    old_ccpa_consent_state = fields.Nested(ConsentRecordSchema(), allow_none=True)
    new_ccpa_consent_state = fields.Nested(ConsentRecordSchema(), allow_none=True)


_NOTIFICATION_SCHEMAS: dict[str, Schema] = {
    "gdpr_consent_state": GdprNotificationSchema(),
    "ccpa_consent_state": CcpaNotificationSchema(),
}

#: The system notification type strings of §6.4.
NOTIFICATION_TYPES: frozenset[str] = frozenset(_NOTIFICATION_SCHEMAS)


class PlatformFieldsSchema(LenientSchema):
    """§6.6 (3.2.0). Checked for type only; the original object is what travels on."""

    mp_account_id = StrictInt(allow_none=True)
    mp_account_name = _opt_str()
    workspace_id = StrictInt(allow_none=True)
    workspace_name = _opt_str()
    input_name = _opt_str()
    app_name = _opt_str()
    app_version = _opt_str()
    dataplan_id = _opt_str()
    dataplan_name = _opt_str()
    dataplan_version = StrictInt(allow_none=True)


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
    # A malformed consent snapshot fails the batch rather than travel on half-read: the partner
    # would act on the events under consent it cannot see.
    consent_state = fields.Nested(ConsentStateSchema(), allow_none=True)
    platform_fields = fields.Nested(PlatformFieldsSchema(), allow_none=True)
    # system_notifications are validated one by one in parse_event_batch, like events.


_BATCH_SCHEMA = EventBatchSchema()

# Batch fields whose problem fails the whole message: the envelope, the user the events are
# about, the consent they are under and the batch's own context (platform_fields, the
# notification list). The door (schemas/envelope.py, `_DoorBatchSchema`) refuses a batch with
# any of these wrong with a 400, so only messages queued before it checked get here. Any other
# batch field of the wrong shape is left out (entry by entry in attribute maps) and counted.
FATAL_BATCH_FIELDS = frozenset(
    {
        "_schema",
        "type",
        "id",
        "timestamp_ms",
        "account",
        "mpid",
        "consent_state",
        "platform_fields",
        "system_notifications",
        "events",
    }
)


def _load_batch(message: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(the message without its unreadable parts, its loaded batch fields, what was left out)."""
    message, dropped = _without_bad_entries(message)
    try:
        return message, _BATCH_SCHEMA.load(message), dropped
    except ValidationError as exc:
        errors = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        if not FATAL_BATCH_FIELDS.intersection(errors):
            message = {key: value for key, value in message.items() if key not in errors}
            dropped += [f"invalid:{name}" for name in errors]
    # A fatal field raises MessageInvalid here, with the errors flattened as everywhere else.
    return message, load_or_invalid(_BATCH_SCHEMA, message), dropped


def _without_bad_entries(message: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The message without the attribute entries and lists no SDK could read, and their reasons.

    One unreadable entry (a list inside user_attributes) leaves out that entry alone; an
    identity list that is not a list leaves out that list: its neighbours,
    and the events, go on.
    """
    dropped: list[str] = []
    changes: dict[str, Any] = {}
    for name, prune in (
        ("user_attributes", prune_settings_map),
        ("integration_attributes", prune_settings_map),
        ("user_attribute_lists", prune_string_lists),
    ):
        value, bad = prune(message.get(name))
        if bad:
            changes[name] = value
            dropped += [f"invalid:{name}"] * len(bad)
    for name in ("user_identities", "partner_identities"):
        value = message.get(name)
        if value is not None and not isinstance(value, list):
            changes[name] = None
            dropped.append(f"invalid:{name}")
    runtime = message.get("runtime_environment")
    if isinstance(runtime, dict) and not isinstance(runtime.get("identities", []), list | None):
        changes["runtime_environment"] = {key: value for key, value in runtime.items() if key != "identities"}
        dropped.append("invalid:runtime_environment.identities")
    return (message | changes if changes else message), dropped


def validate_event(event: Any, index: int = 0) -> SkippedEvent | None:
    """Validate one event; return None if it is valid, else why it is skipped."""
    return check_event(event, index)[1]


def check_event(event: Any, index: int = 0) -> tuple[dict[str, Any] | None, SkippedEvent | None]:
    """(the event to send, None) if it is valid, else (None, why it is skipped).

    The event to send is the original dict, or a copy of it with the numeric strings the
    schema coerced replaced by their numbers (`with_coercions`): nothing else is touched.
    """
    if not isinstance(event, dict):
        return None, SkippedEvent(index, None, REASON_INVALID_EVENT, "Event is not a JSON object.")
    raw_id = event.get("id")
    event_id = raw_id if isinstance(raw_id, str) else None
    event_type = event.get("type")
    if not isinstance(event_type, str) or not event_type:
        return None, SkippedEvent(index, event_id, REASON_INVALID_TYPE, "type: Missing or not a string.")
    schema = _EVENT_SCHEMAS.get(event_type)
    if schema is None:
        return None, SkippedEvent(index, event_id, REASON_UNKNOWN_TYPE, f"type: {event_type!r}")
    try:
        loaded = schema.load(event)
    except ValidationError as exc:
        path, detail = first_error(exc.messages)
        return None, SkippedEvent(index, event_id, f"invalid:{path or 'event'}", detail)
    return with_coercions(event, loaded), None


def validate_notification(notification: Any, index: int = 0) -> SkippedEvent | None:
    """Validate one system notification; None if it is valid, else why it is left out.

    Reasons are prefixed `notification:` so the skipped counters tell them from events'.
    """
    if not isinstance(notification, dict):
        return SkippedEvent(index, None, "notification:invalid", "Notification is not a JSON object.")
    kind = notification.get("type")
    if not isinstance(kind, str) or not kind:
        return SkippedEvent(index, None, "notification:invalid:type", "type: Missing or not a string.")
    schema = _NOTIFICATION_SCHEMAS.get(kind)
    if schema is None:
        # Only the registered types are sent; a new one would need a contract entry first.
        return SkippedEvent(index, None, "notification:unknown_type", f"type: {kind!r}")
    try:
        schema.load(notification)
    except ValidationError as exc:
        path, detail = first_error(exc.messages)
        return SkippedEvent(index, None, f"notification:invalid:{path or 'notification'}", detail)
    return None


def _notifications(value: Any) -> tuple[list[dict[str, Any]], list[SkippedEvent]]:
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise MessageInvalid({"system_notifications": ["Not a valid list."]})
    valid: list[dict[str, Any]] = []
    skipped: list[SkippedEvent] = []
    for index, notification in enumerate(value):
        problem = validate_notification(notification, index)
        if problem is None:
            valid.append(notification)
        else:
            skipped.append(problem)
    return valid, skipped


def parse_event_batch(message: dict[str, Any]) -> EventBatch:
    """Validate an `event_processing_request` and return its parts.

    Raises `MessageInvalid` for an invalid envelope/batch (bad `id`, `timestamp_ms`,
    `account`, a non-list `events` or identity list, wrongly typed batch fields).
    Unknown/invalid events are skipped and listed in `skipped`, unknown/invalid
    system notifications in `skipped_notifications`; invalid identity entries are
    dropped and listed in `dropped_identities`.
    """
    check_message(message, EVENTS)
    message, data, dropped_fields = _load_batch(message)

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
        checked, problem = check_event(event, index)
        if checked is not None:
            events.append(checked)
        if problem is not None:
            skipped.append(problem)

    notifications, skipped_notifications = _notifications(message.get("system_notifications"))

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
        # The originals, not the loaded copies: nothing converted, unknown keys kept, as sent.
        consent_state=message.get("consent_state"),
        system_notifications=notifications,
        platform_fields=message.get("platform_fields"),
        skipped_notifications=skipped_notifications,
        dropped_fields=dropped_fields,
    )
