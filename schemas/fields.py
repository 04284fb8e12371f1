"""Reusable marshmallow fields and helpers for full Firehose message validation.

The worker validates every queued message with the schemas in this package before
mapping it to partner API calls. The protocol notes (`shared/firehose-protocol.md`,
§11.4) ask us to be *more* lenient than the Java SDK: unknown fields, unknown enum
values, unknown identity types and any `firehose_version` are accepted. What we do
reject is a wrong JSON *type* (a number where a string belongs, an object where a
scalar belongs), because the mapping code downstream would otherwise crash on it.

Conventions shared by `events.py`, `audiences.py` and `dsr.py`:

* Input dicts come from `orjson.loads`, so JSON integers are Python ints of any size.
  Nothing here converts through float, so int64 values (`session_id`, negative
  values beyond 2**53) pass through unchanged.
* A problem with the message itself (envelope, account, a list that is not a list)
  raises `MessageInvalid`. Problems with one item of a list (an event, an identity,
  an audience) drop that item and record why, so the rest of the message goes on.
* Reason codes are short, low-cardinality strings suitable as metric labels:
  `unknown_type`, `unknown_action`, `invalid:<field path>` (list indices removed,
  e.g. `invalid:products.position`). The human-readable detail, with indices, is
  kept separately.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from marshmallow import EXCLUDE, Schema, ValidationError, fields

__all__ = [
    "AccountSchema",
    "DroppedIdentity",
    "EnvelopeSchema",
    "IdString",
    "IdentitySchema",
    "LenientSchema",
    "MessageInvalid",
    "NonEmptyString",
    "SettingValue",
    "SettingsMap",
    "StrictBool",
    "StrictInt",
    "StrictNumber",
    "StringList",
    "UUIDString",
    "check_message",
    "coerce_setting_value",
    "exact_float_int",
    "first_error",
    "is_header_value",
    "load_or_invalid",
    "number_from_text",
    "parse_identities",
    "prune_settings_map",
    "prune_string_lists",
    "with_coercions",
]


class MessageInvalid(ValueError):
    """The message as a whole cannot be processed (bad envelope, account, structure).

    `errors` maps field names (dotted paths for nested ones) to marshmallow-style
    error messages, so the worker can log exactly what was wrong.
    """

    def __init__(self, errors: dict[str, Any], message: str | None = None) -> None:
        self.errors = errors
        if message is None:
            path, detail = first_error(errors)
            message = f"invalid message: {detail}" if path else "invalid message"
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class DroppedIdentity:
    """An identity entry that failed validation and was left out of the result."""

    field: str  # where it came from, e.g. "user_identities", "runtime_environment.identities"
    index: int  # position in that list
    reason: str  # e.g. "invalid:value"
    detail: str = ""


# --------------------------------------------------------------------------- fields


# Numeric strings as the SDK's Jackson coerces them into number fields: plain JSON number text,
# nothing Python's int()/float() would also take ("1_000", " 7", "nan", "inf"). The digit counts
# are bounded so a hostile string never costs a big-number parse (int64 has 19 digits).
_INT_TEXT_RE = re.compile(r"-?[0-9]{1,20}")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NUMBER_TEXT_RE = re.compile(r"-?[0-9]{1,40}(?:\.[0-9]{1,40})?(?:[eE][+-]?[0-9]{1,3})?")


class StrictInt(fields.Integer):
    """A JSON integer: rejects bools, floats (even 4.0) and, unless `coerce_strings`, strings.

    Accepts any Python int, including int64 values beyond 2**53 (orjson produces
    exact ints), and returns it unchanged. With `coerce_strings=True` (event fields, where
    the SDK's Jackson coerces), a decimal integer string ("123", "-5") becomes its exact
    int: parsed as text, never through a float. The envelope's own fields stay strict: the
    door refuses those with a 400 naming them.
    """

    def __init__(self, *, coerce_strings: bool = False, **kwargs: Any) -> None:
        self.coerce_strings = coerce_strings
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        # `type(...) is int` excludes bool (a subclass of int) and is the fast path.
        if type(value) is int:
            return value
        if self.coerce_strings and type(value) is str and _INT_TEXT_RE.fullmatch(value):
            number = int(value)
            if _INT64_MIN <= number <= _INT64_MAX:  # what the SDK's long holds, and orjson writes
                return number
        raise self.make_error("invalid", input=value)


def number_from_text(value: str) -> int | float | None:
    """A JSON number written as a string ("10.00", "-3", "1e3"), or None if it is not one.

    Integer text becomes an exact int (no float round trip, int64 stays exact); anything with
    a fraction or exponent a float, which is what the SDK's double fields hold.
    """
    if not _NUMBER_TEXT_RE.fullmatch(value):
        return None
    if _INT_TEXT_RE.fullmatch(value) and _INT64_MIN <= int(value) <= _INT64_MAX:
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else None


class StrictNumber(fields.Field):
    """A JSON number (int or float) for decimal amounts; rejects bools, objects and text.

    The value is returned as parsed (int stays int) so no precision is lost. A numeric
    string ("10.00") is a number, as the SDK's Jackson coerces it (`number_from_text`); the
    event handed on carries the number (`with_coercions`).
    """

    default_error_messages: ClassVar[dict[str, str]] = {"invalid": "Not a valid number."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int | float:
        if type(value) is int or type(value) is float:
            return value
        if type(value) is str:
            number = number_from_text(value)
            if number is not None:
                return number
        raise self.make_error("invalid")


class StrictBool(fields.Field):
    """A JSON boolean. marshmallow's Boolean would accept "yes"/1; we do not."""

    default_error_messages: ClassVar[dict[str, str]] = {"invalid": "Not a valid boolean."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if value is True or value is False:
            return value
        raise self.make_error("invalid")


class NonEmptyString(fields.String):
    """A string that must not be empty (identity members; the SDK throws on empty)."""

    default_error_messages: ClassVar[dict[str, str]] = {"empty": "Must not be empty."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        result = super()._deserialize(value, attr, data, **kwargs)
        if not result:
            raise self.make_error("empty")
        return result


# §2 defines ids as canonical 8-4-4-4-12 hex UUIDs. uuid.UUID() would also accept
# braces, a urn: prefix or no hyphens; mParticle never sends those, and keeping one
# spelling per id makes ids safe to use as keys (de-duplication, logs). Any case.
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class UUIDString(fields.Field):
    """A canonical UUID string; returned as the original string (not a uuid.UUID)."""

    default_error_messages: ClassVar[dict[str, str]] = {"invalid_uuid": "Not a valid UUID."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str) and _UUID_RE.fullmatch(value):
            return value
        raise self.make_error("invalid_uuid")


# The largest magnitude below which every integral float is exactly one integer.
_EXACT_FLOAT_INT = 2**53


class IdString(fields.Field):
    """An id sent as a string (`mpid`: a signed int64 in decimal).

    A JSON integer is accepted too and turned into its exact decimal text, like the
    SDK's Jackson coercion into String fields would. An integral float within ±2**53
    (`12.0`) names exactly one integer and becomes its text; any other float (a fraction,
    or an int64 that went through a double and may name another user), bools and objects
    are rejected: the door refuses them with a 400 naming the field.
    """

    default_error_messages: ClassVar[dict[str, str]] = {"invalid": "Not a valid string."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str):
            return value
        if type(value) is int:
            return str(value)
        exact = exact_float_int(value)
        if exact is not None:
            return str(exact)
        raise self.make_error("invalid")


def exact_float_int(value: Any) -> int | None:
    """The integer an integral float within ±2**53 stands for; None for anything else."""
    if type(value) is float and value.is_integer() and -_EXACT_FLOAT_INT <= value <= _EXACT_FLOAT_INT:
        return int(value)
    return None


_NOT_SCALAR = object()


def coerce_setting_value(value: Any) -> Any:
    """Coerce a settings/attribute value to `str | None`, or return `_NOT_SCALAR`.

    Settings and attribute values are strings on the wire (§3.2), possibly null. The
    SDK's Jackson coerces JSON scalars into String fields, so a number or bool that
    slips through still parses there; we do the same: bools become "true"/"false"
    (lowercase, as Java's String.valueOf would), numbers `str(value)`. Objects and
    arrays cannot be coerced and are an error.
    """
    if value is None or isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int or type(value) is float:
        return str(value)
    return _NOT_SCALAR


class SettingValue(fields.Field):
    """A settings/attribute value: str or None; numbers/bools coerced; no objects/arrays."""

    default_error_messages: ClassVar[dict[str, str]] = {"invalid": "Not a string, number, boolean or null."}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_none", True)
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str | None:
        result = coerce_setting_value(value)
        if result is _NOT_SCALAR:
            raise self.make_error("invalid")
        return result


class SettingsMap(fields.Dict):
    """A JSON object of string → SettingValue (`account_settings`, attributes, flags…).

    Declared as a `fields.Dict(keys=String, values=SettingValue)` for introspection,
    but deserialised in one pass: these maps are on every event, and a single flat
    error message ("value of 'x' …") is easier to report than per-key error dicts.
    Returns a new dict with coerced values.
    """

    default_error_messages: ClassVar[dict[str, str]] = {
        "invalid": "Not a valid mapping type.",
        "invalid_value": "Value of {name!r} is not a string, number, boolean or null.",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keys=fields.String(), values=SettingValue(), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, str | None]:
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        out: dict[str, str | None] = {}
        for key, item in value.items():
            # Keys are always str from JSON; values need checking.
            if item is None or isinstance(item, str):
                out[key] = item
                continue
            coerced = coerce_setting_value(item)
            if coerced is _NOT_SCALAR:
                raise self.make_error("invalid_value", name=key)
            out[key] = coerced
        return out


class StringList(fields.Field):
    """A JSON array of strings (`breadcrumbs`, `list_value`, attribute lists).

    With `coerce=True`, scalar items are coerced like settings values (used where the
    SDK's Jackson would coerce too: attribute lists). Nulls inside are kept only when
    coercing.
    """

    default_error_messages: ClassVar[dict[str, str]] = {
        "invalid": "Not a valid list.",
        "invalid_item": "Item {index} is not a string.",
    }

    def __init__(self, *, coerce: bool = False, **kwargs: Any) -> None:
        self.coerce = coerce
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[Any]:
        if not isinstance(value, list):
            raise self.make_error("invalid")
        if not self.coerce:
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise self.make_error("invalid_item", index=index)
            return value
        out = []
        for index, item in enumerate(value):
            coerced = coerce_setting_value(item)
            if coerced is _NOT_SCALAR:
                raise self.make_error("invalid_item", index=index)
            out.append(coerced)
        return out


# -------------------------------------------------------------------------- schemas


class LenientSchema(Schema):
    """Base for all our schemas: unknown keys are ignored (forward compatibility)."""

    class Meta:
        unknown = EXCLUDE


class IdentitySchema(LenientSchema):
    """`{type, encoding, value}` for user, device and partner identities (§3.1).

    `type` and `encoding` are any non-empty string: new identity types and encodings
    are tolerated rather than rejected (§11.4). `value` must be a non-empty string.
    """

    type = NonEmptyString(required=True)
    encoding = NonEmptyString(required=True)
    value = NonEmptyString(required=True)


class AccountSchema(LenientSchema):
    """`account` (§3.2): int account id plus string→string settings."""

    account_id = StrictInt(required=True)
    account_settings = SettingsMap(load_default=dict, allow_none=True)


class EnvelopeSchema(LenientSchema):
    """Envelope fields common to all requests (§2); `type` is checked separately."""

    id = UUIDString(required=True)
    timestamp_ms = StrictInt(required=True)
    # Any version string is accepted (§2.2); a number would be coerced to text.
    firehose_version = SettingValue(load_default=None)


IDENTITY_SCHEMA = IdentitySchema()


# -------------------------------------------------------------------------- helpers


def first_error(errors: Any, prefix: str = "") -> tuple[str, str]:
    """Return (path, detail) for the first error in a marshmallow error structure.

    `path` is dotted field names without list indices or `_schema`, suitable for a
    reason code (`products.position`); `detail` includes indices and the message
    (`products.0.position: Not a valid integer.`).
    """
    names: list[str] = [prefix] if prefix else []
    shown: list[str] = [prefix] if prefix else []
    node = errors
    while isinstance(node, dict) and node:
        key, node = next(iter(node.items()))
        if key == "_schema":
            continue
        shown.append(str(key))
        if not isinstance(key, int):
            names.append(str(key))
    if isinstance(node, list):
        node = node[0] if node else "invalid"
    return ".".join(names), f"{'.'.join(shown)}: {node}" if shown else str(node)


def _flatten(errors: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested marshmallow errors into {"a.b": [...]} for `MessageInvalid`."""
    if not isinstance(errors, dict):
        return {prefix or "_schema": errors}
    out: dict[str, Any] = {}
    for key, value in errors.items():
        name = prefix if key == "_schema" else (f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name or "_schema"] = value
    return out


def load_or_invalid(schema: Schema, data: Any, prefix: str = "") -> dict[str, Any]:
    """`schema.load(data)`, turning a ValidationError into `MessageInvalid`."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise MessageInvalid(_flatten(exc.messages, prefix)) from exc


def check_message(message: Any, expected_type: str) -> None:
    """The message must be a JSON object; if it names a `type`, it must be ours.

    A missing `type` is tolerated (the dispatcher already chose this parser), but a
    different type means the caller routed the wrong message here.
    """
    if not isinstance(message, dict):
        raise MessageInvalid({"_schema": ["Message is not a JSON object."]})
    msg_type = message.get("type", expected_type)
    if msg_type != expected_type:
        raise MessageInvalid({"type": [f"Expected {expected_type!r}, got {msg_type!r}."]})


def parse_identities(value: Any, field: str) -> tuple[list[dict[str, str]], list[DroppedIdentity]]:
    """Validate an identity list; invalid entries are dropped and reported.

    A missing/null list is empty. A non-list is a structural error (MessageInvalid):
    we cannot tell which identities were meant. Valid entries are returned as new
    dicts holding exactly `type`, `encoding`, `value`.
    """
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise MessageInvalid({field: ["Not a valid list."]})
    valid: list[dict[str, str]] = []
    dropped: list[DroppedIdentity] = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            dropped.append(DroppedIdentity(field, index, "invalid:identity", "Not an object."))
            continue
        try:
            valid.append(IDENTITY_SCHEMA.load(entry))
        except ValidationError as exc:
            path, detail = first_error(exc.messages)
            dropped.append(DroppedIdentity(field, index, f"invalid:{path}", detail))
    return valid, dropped


def with_coercions(original: Any, loaded: Any) -> Any:
    """`original` with the numbers its numeric strings were coerced to by a schema's load.

    Events travel on as the original dicts (unknown keys kept, nothing re-read); only a string
    the schema turned into a number (`"price": "10.00"` → 10.0, `"session_id": "123"` → 123) is
    replaced, in a copy, so the partner gets the number the protocol has there. Nothing else
    changes: a payload that was valid before keeps its exact bytes (and idempotency key).
    Walks only what the schema loaded, so its depth is the schema's, never the body's.
    """
    if isinstance(original, dict) and isinstance(loaded, dict):
        copy: dict[str, Any] | None = None
        for key, value in loaded.items():
            before = original.get(key)
            after = with_coercions(before, value)
            if after is not before:
                if copy is None:
                    copy = dict(original)
                copy[key] = after
        return original if copy is None else copy
    if isinstance(original, list) and isinstance(loaded, list) and len(original) == len(loaded):
        items: list[Any] | None = None
        for index, (before, value) in enumerate(zip(original, loaded, strict=True)):
            after = with_coercions(before, value)
            if after is not before:
                if items is None:
                    items = list(original)
                items[index] = after
        return original if items is None else items
    if type(original) is str and (type(loaded) is int or type(loaded) is float):
        return loaded
    return original


def prune_settings_map(value: Any) -> tuple[Any, list[str]]:
    """A string → scalar map (`user_attributes`) without its entries no SDK could read.

    Returns (the map, the keys left out). An object or array as a value is left out on its own
    (the rest of the map, and of the message, goes on); a value that is not a map at all is
    returned as it is, for the schema to report. The map is copied only when something is left out.
    """
    if not isinstance(value, dict):
        return value, []
    bad = [key for key, item in value.items() if coerce_setting_value(item) is _NOT_SCALAR]
    if not bad:
        return value, []
    return {key: item for key, item in value.items() if key not in bad}, bad


def prune_string_lists(value: Any) -> tuple[Any, list[str]]:
    """`user_attribute_lists` without the lists that are not lists of scalars (or null)."""
    if not isinstance(value, dict):
        return value, []

    def readable(items: Any) -> bool:
        if items is None:
            return True
        return isinstance(items, list) and all(coerce_setting_value(item) is not _NOT_SCALAR for item in items)

    bad = [key for key, items in value.items() if not readable(items)]
    if not bad:
        return value, []
    return {key: items for key, items in value.items() if key not in bad}, bad


# What an HTTP/1.1 field value may hold (RFC 9110 §5.5): visible ASCII, space and tab, and
# obs-text. C0 controls (CR and LF above all: header injection), DEL and the C1 controls are not;
# a character beyond Latin-1 cannot be written into a header at all (http.client encodes
# Latin-1). The apiKey goes into `Authorization: Bearer <key>`, so it must pass this.
_HEADER_VALUE_RE = re.compile(r"[\t\x20-\x7e\xa0-\xff]*")


def is_header_value(value: str) -> bool:
    """Whether `value` can be sent as (part of) an HTTP header value."""
    return _HEADER_VALUE_RE.fullmatch(value) is not None
