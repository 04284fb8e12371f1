"""Full validation of audience messages (protocol §8, §9).

* `parse_subscription`: `audience_subscription_request` — an audience was connected
  to (`add`), reconfigured for (`update`) or disconnected from (`remove`) us.
* `parse_membership_change`: `audience_membership_change_request` — users joined
  or left audiences. Both wire formats are accepted and normalised to the 2.x shape:
  2.x `audiences[]` with `action` `add`/`delete`/`attribute_update`, and 1.x
  `added_audiences`/`removed_audiences` (no `action`), which become `add`/`delete`.

Mind the two action vocabularies (§ "ten things" #1): subscriptions use
`remove`, memberships use `delete`. They are checked separately on purpose.

A membership message carries many users; one bad profile, audience entry or user
attribute entry is skipped and recorded in `MembershipChange.skipped_items` (the
reason codes alone in `MembershipChange.skipped`) instead of failing the whole
message. Envelope/account problems raise `MessageInvalid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError, fields, validate

from schemas.fields import (
    AccountSchema,
    DroppedIdentity,
    EnvelopeSchema,
    IdString,
    LenientSchema,
    MessageInvalid,
    NonEmptyString,
    SettingsMap,
    SettingValue,
    StrictInt,
    StringList,
    check_message,
    first_error,
    load_or_invalid,
    parse_identities,
)
from schemas.messages import MEMBERSHIP, SUBSCRIPTION

__all__ = [
    "AudienceAction",
    "MembershipChange",
    "MessageInvalid",
    "Profile",
    "SkippedMembershipItem",
    "Subscription",
    "parse_membership_change",
    "parse_subscription",
]

SUBSCRIPTION_ACTIONS = ("add", "update", "remove")
MEMBERSHIP_ACTIONS = frozenset({"add", "delete", "attribute_update"})
ATTRIBUTE_ACTIONS = frozenset({"upsert", "delete"})

REASON_UNKNOWN_ACTION = "unknown_action"


# ------------------------------------------------------------------ subscription


@dataclass(slots=True)
class Subscription:
    message_id: str
    account_id: int
    account_settings: dict[str, str | None]
    timestamp_ms: int
    audience_id: int
    audience_name: str | None
    audience_description: str | None
    action: str  # "add" | "update" | "remove"
    settings: dict[str, str | None]
    # None when the request carries no previous settings (absent ≠ previously empty).
    previous_settings: dict[str, str | None] | None
    firehose_version: str | None = None


class SubscriptionSchema(EnvelopeSchema):
    account = fields.Nested(AccountSchema(), required=True)
    audience_id = StrictInt(required=True)
    # Required by §8.1, but nothing we do depends on it: tolerate a missing name.
    audience_name = fields.String(allow_none=True)
    audience_description = fields.String(allow_none=True)
    audience_subscription_settings = SettingsMap(allow_none=True)
    previous_audience_subscription_settings = SettingsMap(allow_none=True)
    # Unlike most enums, an unknown subscription action cannot be tolerated: we
    # would not know whether to create, update or tear down the partner's list.
    action = fields.String(required=True, validate=validate.OneOf(SUBSCRIPTION_ACTIONS))


_SUBSCRIPTION_SCHEMA = SubscriptionSchema()


def parse_subscription(message: dict[str, Any]) -> Subscription:
    """Validate an `audience_subscription_request`; raise `MessageInvalid` if bad."""
    check_message(message, SUBSCRIPTION)
    data = load_or_invalid(_SUBSCRIPTION_SCHEMA, message)
    account = data["account"]
    return Subscription(
        message_id=data["id"],
        account_id=account["account_id"],
        account_settings=account.get("account_settings") or {},
        timestamp_ms=data["timestamp_ms"],
        audience_id=data["audience_id"],
        audience_name=data.get("audience_name"),
        audience_description=data.get("audience_description"),
        action=data["action"],
        settings=data.get("audience_subscription_settings") or {},
        previous_settings=data.get("previous_audience_subscription_settings"),
        firehose_version=data.get("firehose_version"),
    )


# ------------------------------------------------------------------ membership


@dataclass(frozen=True, slots=True)
class SkippedMembershipItem:
    """A profile, audience entry or user-attribute entry left out, and why.

    `path` locates it, e.g. `user_profiles[0].audiences[2]` or
    `user_profiles[0].audiences[1].user_attributes[0]`. `reason` is a short code:
    `unknown_action`, `invalid:profile`, `invalid:audience`, `invalid:user_attribute`
    or `invalid:<field>` (e.g. `invalid:audience_id`).
    """

    path: str
    reason: str
    audience_id: int | None = None
    detail: str = ""


@dataclass(slots=True)
class AudienceAction:
    audience_id: int
    audience_name: str | None
    settings: dict[str, str | None]
    action: str  # "add" | "delete" | "attribute_update"
    # Each: {"key": str, "value": str | None, "list_value": list | None, "action": "upsert" | "delete"}
    user_attributes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Profile:
    mpid: str | None
    user_identities: list[dict[str, str]]
    device_identities: list[dict[str, str]]
    partner_identities: list[dict[str, str]]
    audiences: list[AudienceAction]
    dropped_identities: list[DroppedIdentity] = field(default_factory=list)


@dataclass(slots=True)
class MembershipChange:
    message_id: str
    account_id: int
    account_settings: dict[str, str | None]
    timestamp_ms: int
    profiles: list[Profile]
    # Everything left out, with where and why (see SkippedMembershipItem).
    skipped_items: list[SkippedMembershipItem]
    firehose_version: str | None = None
    # True when `user_profiles` is absent/null: mParticle's periodic verification
    # request (§1.4), to be answered normally without doing anything.
    verification: bool = False

    @property
    def skipped(self) -> list[str]:
        """The reason code of each skipped item, ready for counting.

        Plain strings because the worker counts them directly (`workers/mapping.py`
        feeds this list to its per-reason counters); details are in `skipped_items`.
        """
        return [item.reason for item in self.skipped_items]


class MembershipSchema(EnvelopeSchema):
    account = fields.Nested(AccountSchema(), required=True)


class ProfileSchema(LenientSchema):
    mpid = IdString(allow_none=True)


class AudienceSchema(LenientSchema):
    """Audience entry minus `action`/`user_attributes`, which are checked by hand
    so that 1.x entries (no action) and 2.x entries share this schema."""

    audience_id = StrictInt(required=True)
    # Required by §9.1, but the id is what identifies the audience: tolerate it missing.
    audience_name = fields.String(allow_none=True)
    audience_subscription_settings = SettingsMap(allow_none=True)


class UserAttributeSchema(LenientSchema):
    key = NonEmptyString(required=True)
    value = SettingValue(load_default=None)
    list_value = StringList(coerce=True, allow_none=True, load_default=None)
    action = fields.String(required=True)  # value checked by hand → unknown_action


_MEMBERSHIP_SCHEMA = MembershipSchema()
_PROFILE_SCHEMA = ProfileSchema()
_AUDIENCE_SCHEMA = AudienceSchema()
_USER_ATTRIBUTE_SCHEMA = UserAttributeSchema()

# Profile list fields holding audience entries, with the action implied by 1.x lists.
_AUDIENCE_LISTS: tuple[tuple[str, str | None], ...] = (
    ("audiences", None),
    ("added_audiences", "add"),
    ("removed_audiences", "delete"),
)


def _parse_user_attributes(
    raw: list[Any], path: str, audience_id: int, skipped: list[SkippedMembershipItem]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for index, entry in enumerate(raw):
        item_path = f"{path}.user_attributes[{index}]"
        if entry == {}:
            # The SDK's own sample has a spurious `{}` here (a generator bug, §14.10);
            # it carries no information, so it is dropped without being counted.
            continue
        if not isinstance(entry, dict):
            skipped.append(SkippedMembershipItem(item_path, "invalid:user_attribute", audience_id, "Not an object."))
            continue
        try:
            data = _USER_ATTRIBUTE_SCHEMA.load(entry)
        except ValidationError as exc:
            name, detail = first_error(exc.messages)
            skipped.append(SkippedMembershipItem(item_path, f"invalid:{name}", audience_id, detail))
            continue
        if data["action"] not in ATTRIBUTE_ACTIONS:
            skipped.append(
                SkippedMembershipItem(
                    item_path,
                    REASON_UNKNOWN_ACTION,
                    audience_id,
                    f"action: {data['action']!r}",
                )
            )
            continue
        out.append(
            {
                "key": data["key"],
                "value": data["value"],
                "list_value": data["list_value"],
                "action": data["action"],
            }
        )
    return out


def _parse_audience(
    entry: Any,
    path: str,
    implied_action: str | None,
    skipped: list[SkippedMembershipItem],
) -> AudienceAction | None:
    if not isinstance(entry, dict):
        skipped.append(SkippedMembershipItem(path, "invalid:audience", None, "Not an object."))
        return None
    raw_id = entry.get("audience_id")
    audience_id = raw_id if type(raw_id) is int else None
    try:
        data = _AUDIENCE_SCHEMA.load(entry)
    except ValidationError as exc:
        name, detail = first_error(exc.messages)
        skipped.append(SkippedMembershipItem(path, f"invalid:{name}", audience_id, detail))
        return None
    audience_id = data["audience_id"]

    if implied_action is not None:
        # 1.x list: the list it sits in is the action; any `action` key is ignored.
        action = implied_action
    else:
        action = entry.get("action")
        if not isinstance(action, str):
            skipped.append(
                SkippedMembershipItem(
                    path,
                    "invalid:action",
                    audience_id,
                    "action: Missing or not a string.",
                )
            )
            return None
        if action not in MEMBERSHIP_ACTIONS:
            skipped.append(SkippedMembershipItem(path, REASON_UNKNOWN_ACTION, audience_id, f"action: {action!r}"))
            return None

    raw_attributes = entry.get("user_attributes")
    if raw_attributes is None:
        attributes: list[dict[str, Any]] = []
    elif isinstance(raw_attributes, list):
        attributes = _parse_user_attributes(raw_attributes, path, audience_id, skipped)
    else:
        skipped.append(
            SkippedMembershipItem(
                path,
                "invalid:user_attributes",
                audience_id,
                "user_attributes: Not a valid list.",
            )
        )
        return None

    return AudienceAction(
        audience_id=audience_id,
        audience_name=data.get("audience_name"),
        settings=data.get("audience_subscription_settings") or {},
        action=action,
        user_attributes=attributes,
    )


def _parse_profile(raw: Any, index: int, skipped: list[SkippedMembershipItem]) -> Profile | None:
    path = f"user_profiles[{index}]"
    if not isinstance(raw, dict):
        skipped.append(SkippedMembershipItem(path, "invalid:profile", None, "Not an object."))
        return None
    try:
        data = _PROFILE_SCHEMA.load(raw)
        user_ids, dropped = parse_identities(raw.get("user_identities"), f"{path}.user_identities")
        device_ids, dropped_dev = parse_identities(raw.get("device_identities"), f"{path}.device_identities")
        partner_ids, dropped_partner = parse_identities(raw.get("partner_identities"), f"{path}.partner_identities")
    except ValidationError as exc:
        name, detail = first_error(exc.messages)
        skipped.append(SkippedMembershipItem(path, f"invalid:{name}", None, detail))
        return None
    except MessageInvalid as exc:
        # A non-list identity list: the profile is unusable, the message is not.
        name = next(iter(exc.errors)).rsplit(".", 1)[-1]
        skipped.append(SkippedMembershipItem(path, f"invalid:{name}", None, str(exc)))
        return None

    audiences: list[AudienceAction] = []
    for list_name, implied_action in _AUDIENCE_LISTS:
        entries = raw.get(list_name)
        if entries is None:
            continue
        if not isinstance(entries, list):
            skipped.append(
                SkippedMembershipItem(
                    path,
                    f"invalid:{list_name}",
                    None,
                    f"{list_name}: Not a valid list.",
                )
            )
            continue
        for a_index, entry in enumerate(entries):
            action = _parse_audience(entry, f"{path}.{list_name}[{a_index}]", implied_action, skipped)
            if action is not None:
                audiences.append(action)

    return Profile(
        mpid=data.get("mpid"),
        user_identities=user_ids,
        device_identities=device_ids,
        partner_identities=partner_ids,
        audiences=audiences,
        dropped_identities=dropped + dropped_dev + dropped_partner,
    )


def parse_membership_change(message: dict[str, Any]) -> MembershipChange:
    """Validate an `audience_membership_change_request`.

    Missing/null `user_profiles` is a verification request: `profiles == []` and
    `verification` is True. A non-list `user_profiles` raises `MessageInvalid`.
    """
    check_message(message, MEMBERSHIP)
    data = load_or_invalid(_MEMBERSHIP_SCHEMA, message)
    raw_profiles = message.get("user_profiles")
    if raw_profiles is not None and not isinstance(raw_profiles, list):
        raise MessageInvalid({"user_profiles": ["Not a valid list."]})

    profiles: list[Profile] = []
    skipped: list[SkippedMembershipItem] = []
    for index, raw in enumerate(raw_profiles or []):
        profile = _parse_profile(raw, index, skipped)
        if profile is not None:
            profiles.append(profile)

    account = data["account"]
    return MembershipChange(
        message_id=data["id"],
        account_id=account["account_id"],
        account_settings=account.get("account_settings") or {},
        timestamp_ms=data["timestamp_ms"],
        profiles=profiles,
        skipped_items=skipped,
        firehose_version=data.get("firehose_version"),
        verification=raw_profiles is None,
    )
