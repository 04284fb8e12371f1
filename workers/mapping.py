"""From a Firehose message to partner Operations in the reference contract's shape.

Plain functions of the parsed message: no I/O, so they are unit-tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.audiences import parse_membership_change, parse_subscription
from schemas.dsr import parse_dsr
from schemas.events import parse_event_batch
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


def plan_events(message: dict[str, Any]) -> Plan:
    batch = parse_event_batch(message)
    plan = Plan(batch.message_id, batch.account_id, skipped=_count([s.reason for s in batch.skipped]))
    if not batch.events:
        return plan
    user = _user(batch) | {
        "attributes": batch.user_attributes,
        "attribute_lists": batch.user_attribute_lists,
    }
    payload = {
        "batches": [
            {
                "message_id": batch.message_id,
                "account_id": batch.account_id,
                "timestamp_ms": batch.timestamp_ms,
                "source_channel": batch.source_channel,
                "user": user,
                "device": batch.runtime_environment,
                "events": batch.events,
            }
        ]
    }
    plan.operations.append(
        Operation(OperationKind.EVENTS, payload, _api_key(batch.account_settings), message_id=batch.message_id)
    )
    return plan


def plan_subscription(message: dict[str, Any]) -> Plan:
    sub = parse_subscription(message)
    plan = Plan(sub.message_id, sub.account_id)
    api_key = _api_key(sub.account_settings)
    if sub.action == "remove":
        op = Operation(
            OperationKind.AUDIENCE_DELETE,
            {"account_id": sub.account_id},
            api_key,
            sub.audience_id,
            sub.message_id,
            timestamp_ms=sub.timestamp_ms,
        )
    else:
        payload = {
            "account_id": sub.account_id,
            "name": sub.audience_name,
            "description": sub.audience_description,
            "settings": sub.settings,
        }
        op = Operation(
            OperationKind.AUDIENCE_UPSERT,
            payload,
            api_key,
            sub.audience_id,
            sub.message_id,
            timestamp_ms=sub.timestamp_ms,
        )
    plan.operations.append(op)
    return plan


_MEMBER_ACTIONS = {"add": "add", "delete": "delete", "attribute_update": "update_attributes"}


def plan_membership(message: dict[str, Any]) -> Plan:
    change = parse_membership_change(message)
    plan = Plan(change.message_id, change.account_id, skipped=_count(list(change.skipped)))
    by_audience: dict[int, list[dict[str, Any]]] = {}
    for profile in change.profiles:
        for audience in profile.audiences:
            entry: dict[str, Any] = {
                "action": _MEMBER_ACTIONS[audience.action],
                "timestamp_ms": change.timestamp_ms,
                "user": _user(profile),
            }
            if audience.action == "attribute_update":
                entry["attributes"] = audience.user_attributes
            by_audience.setdefault(audience.audience_id, []).append(entry)
    if not by_audience:
        return plan
    api_key = _api_key(change.account_settings)
    for audience_id, changes in sorted(by_audience.items()):
        payload = {"account_id": change.account_id, "changes": changes}
        plan.operations.append(Operation(OperationKind.MEMBERS, payload, api_key, audience_id, change.message_id))
    return plan


def plan_dsr(message: dict[str, Any]) -> Plan:
    request = parse_dsr(message)
    plan = Plan(request.message_id, request.account_id)
    if request.request_type != "erasure":
        plan.skipped = {f"unsupported_dsr_type:{request.request_type}": 1}
        return plan
    payload = {
        "account_id": request.account_id,
        "request_id": request.request_id,
        "regulation": request.regulation,
        "identities": request.identities,
    }
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


def plan_message(message: dict[str, Any]) -> Plan:
    """The operations one accepted message turns into; raises PermanentFailure or MessageInvalid."""
    kind = message.get("type") if isinstance(message, dict) else None
    planner = PLANNERS.get(kind)
    if planner is None:
        raise PermanentFailure("unsupported_type", str(kind)[:100])
    plan = planner(message)
    plan.message_type = kind
    return plan
