"""Full validation of `dsr_processing_request` messages (protocol §10).

DSR (data subject requests, e.g. GDPR erasure) follow the OpenDSR request shape
with the Firehose envelope added. The public record is thin and contradictory
(§10.1, §14.6), so this parser is deliberately forgiving: the envelope and
`account` are optional (the SDK fixture omits the envelope; generated samples omit
`account`), and an unreadable `submitted_time` yields `None` plus a warning rather
than a rejection — an erasure request must not be dropped over a timestamp format.
Present-but-wrongly-typed envelope/account fields still raise `MessageInvalid`.

`event_side_identities` translates the OpenDSR identities into the type names and
encodings the same user's events carry (docs/partner-api.md, "Erasure"), so the
partner finds the user without knowing OpenDSR. The encodings are those the registration
in effect asks for (`registered_encodings` of its `permissions`), passed in by the worker.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from marshmallow import fields

from schemas.fields import (
    DroppedIdentity,
    IdentitySchema,
    LenientSchema,
    MessageInvalid,
    SettingsMap,
    SettingValue,
    StrictInt,
    UUIDString,
    check_message,
    first_error,
    load_or_invalid,
)
from schemas.messages import DSR

__all__ = [
    "EVENT_IDENTITY_ENCODINGS",
    "OPENDSR_TO_FIREHOSE",
    "DsrRequest",
    "MessageInvalid",
    "event_side_identities",
    "hash_identity_value",
    "parse_dsr",
    "registered_encodings",
    "submitted_time_to_ms",
]

# Integers above this are milliseconds, below it seconds: 10**11 s is the year 5138,
# 10**11 ms is 1973, so real timestamps of either unit fall clearly on one side.
_MS_THRESHOLD = 10**11

# A converted time outside 1970-01-01 … 9999-12-31 is no submission time: treated as unreadable
# rather than forwarded as a number the partner's datetime type cannot hold.
_MAX_MS = 253_402_300_799_999

# Plain decimal numbers written as strings ("1714592744.067"), read as numbers the way
# Jackson's InstantDeserializer treats numeric-looking strings.
_NUMERIC_RE = re.compile(r"-?\d+(\.\d+)?")

# mParticle-specific identity types (mpid, other…other10, …) travel here (§10.1).
_EXTENSION_KEY = "opendsr.mparticle.com"

# OpenDSR `subject_identities` type → the Firehose identity type (§3.1) the events carry it
# under. Only the two whose names differ need translating; the other OpenDSR types (§10.1) are
# spelled as in Firehose already. Extension identities (mpid, other…other10, mobile_number)
# use Firehose names, so they pass through this table unchanged.
OPENDSR_TO_FIREHOSE: dict[str, str] = {
    "controller_customer_id": "customer",
    "android_advertising_id": "google_advertising_id",
}

# The encoding the DEFAULT registration (service/module_registration.json, `permissions`) asks
# mParticle to give each identity type on events: what an erasure uses when no registration is
# passed in. The worker passes the one in effect (REGISTRATION_FILE may change encodings), via
# `registered_encodings`. schemas/ may not import service/, so the default is repeated here;
# tests/unit/test_erasure.py fails if the two ever disagree. Types absent never reach the
# partner on events, and an erasure sends them as received.
EVENT_IDENTITY_ENCODINGS: dict[str, str] = {
    "ios_advertising_id": "raw",
    "ios_vendor_id": "raw",
    "google_advertising_id": "raw",
    "android_id": "raw",
    "customer": "raw",
    "email": "sha256",
    "mobile_number": "sha256",
}

_HASHES = frozenset({"md5", "sha1", "sha256"})

# The registration's permission lists that name identity types events may carry (§5.2).
_IDENTITY_PERMISSIONS = ("device_identities", "user_identities", "partner_identities")


def registered_encodings(registration: Mapping[str, Any]) -> dict[str, str]:
    """Identity type → the encoding a registration asks mParticle to put on events, from its
    `permissions` (a registration body as service.registration builds it). A registration without
    permissions asks for no identities: every erasure identity is then sent as received."""
    permissions = registration.get("permissions") or {}
    return {
        item["type"]: item["encoding"]
        for name in _IDENTITY_PERMISSIONS
        for item in permissions.get(name) or ()
        if isinstance(item, Mapping) and isinstance(item.get("type"), str) and isinstance(item.get("encoding"), str)
    }


@dataclass(slots=True)
class DsrRequest:
    message_id: str | None
    account_id: int | None
    account_settings: dict[str, str | None]
    request_id: str | None  # subject_request_id
    request_type: str | None  # subject_request_type, e.g. "erasure" (others tolerated)
    submitted_time_ms: int | None
    identities: list[dict[str, str]]  # {type, encoding, value}
    regulation: str | None
    api_version: str | None
    timestamp_ms: int | None = None
    firehose_version: str | None = None
    dropped_identities: list[DroppedIdentity] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. "unparseable:submitted_time"


class _DsrAccountSchema(LenientSchema):
    # Unlike event/audience messages, a DSR account may lack its id (no sample has one).
    account_id = StrictInt(allow_none=True)
    account_settings = SettingsMap(allow_none=True)


class DsrSchema(LenientSchema):
    id = UUIDString(allow_none=True)
    timestamp_ms = StrictInt(allow_none=True)
    firehose_version = SettingValue(load_default=None)
    account = fields.Nested(_DsrAccountSchema(), allow_none=True)
    subject_request_id = fields.String(allow_none=True)
    subject_request_type = fields.String(allow_none=True)
    api_version = SettingValue(load_default=None)  # "3.0"; a bare 3.0 number is coerced
    regulation = fields.String(allow_none=True)


_DSR_SCHEMA = DsrSchema()
_IDENTITY_SCHEMA = IdentitySchema()


def _number_to_ms(value: float | Decimal) -> int | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if abs(value) > _MS_THRESHOLD:
        return int(value)  # already milliseconds
    millis = Decimal(value) * 1000 if isinstance(value, int) else Decimal(str(value)) * 1000
    return int(millis.to_integral_value(rounding=ROUND_HALF_EVEN))


def submitted_time_to_ms(value: Any) -> int | None:
    """Convert a `submitted_time` in any of the §10.1 forms to epoch milliseconds.

    * ISO-8601 string ("2021-11-01T15:00:00Z"; naive times are taken as UTC);
    * decimal epoch seconds (1714592744.067235), also as a numeric string;
    * integer: milliseconds if > 10**11, else seconds.
    The magnitude rule is applied to decimals too, so a decimal millisecond value
    is not misread as seconds. Returns None if the value cannot be understood or
    falls outside 1970 … 9999.
    """
    if value is None or value is True or value is False:
        return None
    millis = _to_ms(value)
    return millis if millis is not None and 0 <= millis <= _MAX_MS else None


def _to_ms(value: Any) -> int | None:
    if type(value) is int or type(value) is float:
        return _number_to_ms(value)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if _NUMERIC_RE.fullmatch(text):
        # An integer string follows the integer rule, a decimal one the decimal rule.
        return _number_to_ms(Decimal(text) if "." in text else int(text))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    # timestamp() is a float; go through integer arithmetic to keep ms exact.
    delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def hash_identity_value(value: str, encoding: str) -> str:
    """An identity value hashed the way mParticle hashes it for events (§3.1).

    The spec: the hashed forms are of the value trimmed and lower-cased first, as lowercase
    hex. Trimming is `str.strip()` (the spec names no character set; for the ASCII spaces, tabs
    and newlines real values carry it equals Java's `trim()`). UTF-8 bytes are hashed.
    """
    normalised = value.strip().lower().encode("utf-8")
    return hashlib.new(encoding, normalised).hexdigest()


def event_side_identities(
    identities: list[dict[str, str]], encodings: Mapping[str, str] = EVENT_IDENTITY_ENCODINGS
) -> tuple[list[dict[str, str]], int]:
    """The identities as the user's events carry them: Firehose type names, the encodings
    `encodings` (type → encoding, the registration's: `registered_encodings`) names.

    Each identity's type is translated (`OPENDSR_TO_FIREHOSE`); when the registration asks the
    events to carry that type hashed and the identity came raw, its value is hashed exactly as
    mParticle does. A value already in the events' encoding passes as is; types the events never
    carry keep the name and encoding they came with. Returns the identities (de-duplicated, in
    order) and how many could not be brought into the events' encoding (e.g. an md5 value where
    events carry sha256, or a hash where events carry raw): those are sent as received.
    """
    result: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    mismatched = 0
    for identity in identities:
        kind = OPENDSR_TO_FIREHOSE.get(identity["type"], identity["type"])
        encoding, value = identity["encoding"], identity["value"]
        wanted = encodings.get(kind)
        if wanted is not None and wanted != encoding:
            if encoding == "raw" and wanted in _HASHES:
                encoding, value = wanted, hash_identity_value(value, wanted)
            else:
                # A hash cannot be undone nor turned into another hash.
                mismatched += 1
        key = (kind, encoding, value)
        if key not in seen:
            seen.add(key)
            result.append({"type": kind, "encoding": encoding, "value": value})
    return result, mismatched


def _collect_identities(
    raw: Any,
    field_name: str,
    identities: list[dict[str, str]],
    dropped: list[DroppedIdentity],
) -> None:
    """Flatten OpenDSR `subject_identities` into {type, encoding, value} dicts.

    The Firehose form is an object: type → {encoding, value}. OpenDSR 1.0 used a
    list of {identity_type, identity_value, identity_format}; it is accepted too.
    A missing `encoding` defaults to "raw", the only encoding DSR allows since 2.9.2.
    """
    if raw is None:
        return
    if isinstance(raw, dict):
        entries = [(key, {**item, "type": key} if isinstance(item, dict) else item) for key, item in raw.items()]
    elif isinstance(raw, list):
        entries = []
        for index, item in enumerate(raw):
            if isinstance(item, dict):
                item = {
                    "type": item.get("type", item.get("identity_type")),
                    "encoding": item.get("encoding", item.get("identity_format")),
                    "value": item.get("value", item.get("identity_value")),
                }
            entries.append((index, item))
    else:
        raise MessageInvalid({field_name: ["Not a valid mapping type."]})

    seen = {(i["type"], i["encoding"], i["value"]) for i in identities}
    for position, (where, item) in enumerate(entries):
        if not isinstance(item, dict):
            dropped.append(
                DroppedIdentity(
                    f"{field_name}.{where}",
                    position,
                    "invalid:identity",
                    "Not an object.",
                )
            )
            continue
        if item.get("encoding") is None:
            item = {**item, "encoding": "raw"}
        errors = _IDENTITY_SCHEMA.validate(item)
        if errors:
            path, detail = first_error(errors)
            dropped.append(DroppedIdentity(f"{field_name}.{where}", position, f"invalid:{path}", detail))
            continue
        identity = {
            "type": item["type"],
            "encoding": item["encoding"],
            "value": item["value"],
        }
        key = (identity["type"], identity["encoding"], identity["value"])
        if key not in seen:
            seen.add(key)
            identities.append(identity)


def parse_dsr(message: dict[str, Any]) -> DsrRequest:
    """Validate a `dsr_processing_request`; raise `MessageInvalid` on wrong types.

    `identities` holds the standard `subject_identities` followed by the
    mParticle-specific ones from `extensions["opendsr.mparticle.com"]`
    (de-duplicated): for an erasure, every identifier we are given is useful.
    """
    check_message(message, DSR)
    data = load_or_invalid(_DSR_SCHEMA, message)

    identities: list[dict[str, str]] = []
    dropped: list[DroppedIdentity] = []
    _collect_identities(message.get("subject_identities"), "subject_identities", identities, dropped)
    extensions = message.get("extensions")
    if isinstance(extensions, dict) and isinstance(extensions.get(_EXTENSION_KEY), dict):
        _collect_identities(
            extensions[_EXTENSION_KEY].get("subject_identities"),
            f"extensions.{_EXTENSION_KEY}.subject_identities",
            identities,
            dropped,
        )

    warnings: list[str] = []
    raw_time = message.get("submitted_time")
    submitted = submitted_time_to_ms(raw_time)
    if submitted is None and raw_time is not None:
        warnings.append("unparseable:submitted_time")

    account = data.get("account") or {}
    return DsrRequest(
        message_id=data.get("id"),
        account_id=account.get("account_id"),
        account_settings=account.get("account_settings") or {},
        request_id=data.get("subject_request_id"),
        request_type=data.get("subject_request_type"),
        submitted_time_ms=submitted,
        identities=identities,
        regulation=data.get("regulation"),
        api_version=data.get("api_version"),
        timestamp_ms=data.get("timestamp_ms"),
        firehose_version=data.get("firehose_version"),
        dropped_identities=dropped,
        warnings=warnings,
    )
