"""A big message as far as the door reads it: every top-level field parsed but the long list.

An event batch's events and a membership change's user profiles are where a body's bytes are,
and the request path reads nothing inside them: it needs to know that the list is a list and
whether it is empty. Parsing them anyway built some 2,200 dicts and lists for a 130 KB membership
change, and building, collecting and freeing those was the largest part of the web's CPU for
such a message (bench/RESULTS.md, "Profile"). Here msgspec walks the body once, checking all of
it as JSON, and keeps each top-level field as raw bytes; every field but the list is then parsed
by orjson, as the worker will parse it, and the list stands as a `RawItems`.

What the door still parses whole (`view` gives None): a body under MIN_BYTES, anything msgspec
does not read, any body that is not valid UTF-8 and any message of another type.
What it no longer sees, inside an item only: a number past a double's range and nesting past
what orjson writes. The worker reads those items (workers/repair.py) and skips and counts one it
cannot send, as it does any other bad item.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from schemas.messages import ITEMS_FIELD

# Below this a whole parse is as cheap: a 7 KB event batch parses in half the time of the view,
# a 56 KB one in over twice it.
MIN_BYTES = 16 * 1024

_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])
_WHITESPACE = b" \t\r\n"


class RawItems(list):  # type: ignore[type-arg]
    """Stands for a message's list of items, unparsed: empty when the list is, else holding one
    element, the whole list's raw JSON (so its length is not the number of items). The door asks
    no more than whether the list is a list and has items."""


class MessageView(dict[str, Any]):
    """A message whose `items_field`, when it is a list, is a RawItems."""

    items_field: str


def view(body: bytes) -> MessageView | None:
    """The message without its items parsed, or None: then parse the body whole."""
    if len(body) < MIN_BYTES or not _is_utf8(body):
        return None
    try:
        top = _TOP.decode(body)
        kind_raw = top.get("type")
        kind = orjson.loads(memoryview(kind_raw)) if kind_raw is not None else None
        field = ITEMS_FIELD.get(kind) if type(kind) is str else None
        if field is None:
            return None
        message = MessageView()
        message.items_field = field
        for key, raw in top.items():
            data = memoryview(raw)
            if key == field and data[:1] == b"[":
                message[key] = _raw_items(data, raw)
            else:
                message[key] = orjson.loads(data)
    except (msgspec.DecodeError, msgspec.ValidationError, orjson.JSONDecodeError, RecursionError):
        return None  # the whole parse gives orjson's own answer
    return message


def _raw_items(data: memoryview, raw: msgspec.Raw) -> RawItems:
    # msgspec took it as valid JSON that opens with "[": empty if "]" is the next non-blank byte.
    head = bytes(data[1:65]).lstrip(_WHITESPACE)
    if not head:  # more blanks than that: rare enough to parse it whole
        return RawItems([raw] if msgspec.json.decode(data, type=list[msgspec.Raw]) else [])
    return RawItems() if head[:1] == b"]" else RawItems([raw])


def _is_utf8(body: bytes) -> bool:
    # msgspec does not check the bytes of a string it walks past; orjson refuses invalid UTF-8.
    if body.isascii():
        return True
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
