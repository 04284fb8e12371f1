"""From a Firehose message to partner Operations in the reference contract's shape.

Plain functions of the parsed message: no I/O, so they are unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from common.config import Settings
from schemas.audiences import parse_membership_change, parse_subscription
from schemas.dsr import EVENT_IDENTITY_ENCODINGS, event_side_identities, parse_dsr, registered_encodings
from schemas.events import EventBatch, parse_event_batch
from schemas.messages import DSR, EVENTS, MEMBERSHIP, SUBSCRIPTION
from workers.partner.base import Operation, OperationKind

API_KEY_SETTING = "apiKey"


class PermanentFailure(Exception):
    """The message can never be delivered as it is (e.g. no API key); dead-letter it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Plan:
    message_id: str | None
    account_id: int | None
    message_type: str | None = None
    operations: list[Operation] = field(default_factory=list)
    # reason -> count, for the skipped-events counters
    skipped: dict[str, int] = field(default_factory=dict)


def _api_key(settings: dict[str, Any] | None) -> str:
    key = (settings or {}).get(API_KEY_SETTING)
    if not key:
        raise PermanentFailure("missing_api_key", "account_settings has no apiKey")
    return key


def _count(reasons: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _user(profile: Any) -> dict[str, Any]:
    return {
        "mpid": profile.mpid,
        "user_identities": profile.user_identities,
        "device_identities": profile.device_identities,
        "partner_identities": profile.partner_identities,
    }


def _event_batch_payload(batch: EventBatch) -> dict[str, Any]:
    """One batch of the `POST /v1/events` payload: every §6.1 field a partner may act on
    (docs/partner-api.md, "Which fields of mParticle's batch travel"). Absent fields keep
    their key (null, {} or []), so a partner never has to tell "missing" from "empty"."""
    user = _user(batch) | {
        "attributes": batch.user_attributes,
        "attribute_lists": batch.user_attribute_lists,
    }
    return {
        "message_id": batch.message_id,
        "account_id": batch.account_id,
        "timestamp_ms": batch.timestamp_ms,
        # The shape of what follows depends on it (e.g. consent records' `timestamp` before 1.10).
        "firehose_version": batch.firehose_version,
        "source_id": batch.source_id,
        "source_channel": batch.source_channel,
        "user": user,
        "device": batch.runtime_environment,
        "device_application_stamp": batch.device_application_stamp,
        "integration_attributes": batch.integration_attributes,
        "platform_fields": batch.platform_fields,
        # The snapshot the events were collected under, and the changes that led to it.
        "consent_state": batch.consent_state,
        "system_notifications": batch.system_notifications,
        "events": batch.events,
    }


def plan_events(message: dict[str, Any]) -> Plan:
    batch = parse_event_batch(message)
    reasons = [s.reason for s in batch.skipped] + [s.reason for s in batch.skipped_notifications]
    reasons += batch.dropped_fields  # batch fields left out for their shape: counted the same way
    plan = Plan(batch.message_id, batch.account_id, skipped=_count(reasons))
    # A consent change is work even without events (3.2.0 eventless batches): the partner must
    # learn of a withdrawal whether or not the user did anything else.
    if not batch.events and not batch.system_notifications:
        return plan
    payload = {"batches": [_event_batch_payload(batch)]}
    plan.operations.append(
        Operation(OperationKind.EVENTS, payload, _api_key(batch.account_settings), message_id=batch.message_id)
    )
    return plan


def plan_subscription(message: dict[str, Any]) -> Plan:
    sub = parse_subscription(message)
    plan = Plan(sub.message_id, sub.account_id)
    api_key = _api_key(sub.account_settings)
    # The audience as mParticle describes it, on every change of it: a `remove` too, so the partner
    # knows which of its lists to delete (its own id is in the settings it returned on `add`).
    # `previous_settings` is new in these payloads, and payloads go into idempotency keys: messages
    # planned before it got new keys, which only matters for a message in flight across a deploy
    # (the partner then sees it twice, under two keys; a repeat of the same audience state).
    payload = {
        "account_id": sub.account_id,
        "name": sub.audience_name,
        "description": sub.audience_description,
        "settings": sub.settings,
        "previous_settings": sub.previous_settings,
    }
    kind = OperationKind.AUDIENCE_DELETE if sub.action == "remove" else OperationKind.AUDIENCE_UPSERT
    plan.operations.append(
        Operation(kind, payload, api_key, sub.audience_id, sub.message_id, timestamp_ms=sub.timestamp_ms)
    )
    return plan


_MEMBER_ACTIONS = {"add": "add", "delete": "delete", "attribute_update": "update_attributes"}


def plan_membership(message: dict[str, Any]) -> Plan:
    change = parse_membership_change(message)
    plan = Plan(change.message_id, change.account_id, skipped=_count(list(change.skipped)))
    by_audience: dict[int, list[dict[str, Any]]] = {}
    # Each audience's name and settings as the message gives them (every entry of an audience
    # carries them; the last one non-empty counts): the partner's list id is in the settings.
    described: dict[int, dict[str, Any]] = {}
    for profile in change.profiles:
        for audience in profile.audiences:
            entry: dict[str, Any] = {
                "action": _MEMBER_ACTIONS[audience.action],
                "timestamp_ms": change.timestamp_ms,
                "user": _user(profile),
            }
            # Attributes ride on `add` too (the user joins with them). Only when there are some, so
            # an `add` without attributes keeps the payload, and the idempotency key, it always had.
            if audience.action == "attribute_update" or (audience.action == "add" and audience.user_attributes):
                entry["attributes"] = audience.user_attributes
            by_audience.setdefault(audience.audience_id, []).append(entry)
            about = described.setdefault(audience.audience_id, {"name": None, "settings": {}})
            if audience.audience_name is not None:
                about["name"] = audience.audience_name
            if audience.settings:
                about["settings"] = audience.settings
    if not by_audience:
        return plan
    api_key = _api_key(change.account_settings)
    for audience_id, changes in sorted(by_audience.items()):
        # `audience` is new in these payloads, and payloads go into idempotency keys: fine for new
        # messages. A message in flight across the deploy gets a new key and may reach the partner
        # a second time; the audience guard (workers/audiences.py) still drops whatever of it the
        # partner has a newer change for.
        payload = {"account_id": change.account_id, "audience": described[audience_id], "changes": changes}
        plan.operations.append(Operation(OperationKind.MEMBERS, payload, api_key, audience_id, change.message_id))
    return plan


def identity_encodings_for(settings: Settings) -> dict[str, str]:
    """Identity type → encoding, as the registration in effect (REGISTRATION_* and REGISTRATION_FILE)
    asks mParticle to put them on events: the same document the web answers registration with."""
    # service.registration builds it from settings alone (no Flask, no Redis), cached per set of
    # values; imported here, not at the top, because it is the one thing workers take from service/.
    from service.registration import registration_for

    return registered_encodings(registration_for(settings))


def plan_dsr(message: dict[str, Any], identity_encodings: Mapping[str, str] = EVENT_IDENTITY_ENCODINGS) -> Plan:
    """`identity_encodings`: the registration's (identity_encodings_for); the default registration's if not given."""
    request = parse_dsr(message)
    plan = Plan(request.message_id, request.account_id)
    if request.request_type != "erasure":
        plan.skipped = {f"unsupported_dsr_type:{request.request_type}": 1}
        return plan
    # The partner stores the user under the names and encodings the events carried (a sha256
    # email, google_advertising_id, ...): the erasure speaks the same, not OpenDSR.
    identities, mismatched = event_side_identities(request.identities, identity_encodings)
    payload: dict[str, Any] = {
        "account_id": request.account_id,
        "request_id": request.request_id,
        "regulation": request.regulation,
        "identities": identities,
    }
    if request.submitted_time_ms is not None:
        payload["submitted_time_ms"] = request.submitted_time_ms
    # An unreadable submitted_time is left out, not refused: a 400 would make mParticle drop the
    # erasure for good, and the partner can erase without it. Counted, as is an identity the
    # events' encoding could not be reached for (e.g. an md5 value where events carry sha256).
    reasons = list(request.warnings) + ["dsr_identity_encoding_mismatch"] * mismatched
    plan.skipped = _count(reasons)
    plan.operations.append(
        Operation(OperationKind.ERASE, payload, _api_key(request.account_settings), message_id=request.message_id)
    )
    return plan


PLANNERS = {
    EVENTS: plan_events,
    SUBSCRIPTION: plan_subscription,
    MEMBERSHIP: plan_membership,
    DSR: plan_dsr,
}


def plan_message(message: dict[str, Any], identity_encodings: Mapping[str, str] | None = None) -> Plan:
    """The operations one accepted message turns into; raises PermanentFailure or MessageInvalid.

    `identity_encodings` (identity_encodings_for the worker's settings) decides how an erasure's
    identities are encoded; None: the default registration's."""
    kind = message.get("type") if isinstance(message, dict) else None
    planner = PLANNERS.get(kind)
    if planner is None:
        raise PermanentFailure("unsupported_type", str(kind)[:100])
    if kind == DSR and identity_encodings is not None:
        # Also when it is empty: a registration that asks for no identities gets them as received.
        planner = partial(plan_dsr, identity_encodings=identity_encodings)
    plan = planner(message)
    plan.message_type = kind
    return plan
