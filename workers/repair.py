"""What the door lets in without parsing it, read and sent as far as it can be.

The door checks every byte of an event batch's events and a membership change's user profiles
as JSON but does not parse them (service/message_view.py), so two things orjson refuses can
reach the worker inside one item. Neither fails the message:

- A number past a double's range (1e400, a 400-digit integer): orjson cannot read the body; the
  standard library can, and such a number is read as null, which is what orjson (like
  JavaScript) writes for one.
- Nesting deeper than orjson writes (254 levels, less the levels a partner payload wraps an item
  in): the item cannot be sent. It is skipped and counted (`unserialisable`) like any other bad
  item, and the rest of the message is sent.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from schemas.messages import ITEMS_FIELD

# An item sits a few levels down in any partner payload ({"batches": [{"events": [item]}]}); one
# nesting no deeper than this is written with levels to spare. mParticle's nest a handful.
MAX_ITEM_DEPTH = 200
UNSERIALISABLE = "unserialisable"
# orjson reads integers in this range as int, any other as a float.
_INT_MIN, _INT_END = -(2**63), 2**64


def load_body(body: str | bytes) -> Any:
    """orjson's reading of a message body, else the standard library's with every number past a
    double's range as None; raises orjson.JSONDecodeError when neither reads it."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(body, parse_int=_int, parse_float=_float, parse_constant=_refuse)
        except (ValueError, RecursionError):
            raise exc from None


def _float(text: str) -> float | None:
    value = float(text)
    return None if math.isinf(value) else value


def _int(text: str) -> int | float | None:
    # A long digit string goes straight to float: int() refuses over 4,300 digits.
    if len(text) <= 21:
        value = int(text)
        if _INT_MIN <= value < _INT_END:
            return value
    return _float(text)


def _refuse(name: str) -> None:
    raise ValueError(f"not JSON: {name}")


def without_deep_items(message: Any) -> tuple[Any, int]:
    """The message without the items nested deeper than MAX_ITEM_DEPTH, and how many went."""
    field = ITEMS_FIELD.get(message.get("type")) if isinstance(message, dict) else None
    items = message.get(field) if field else None
    if not isinstance(items, list):
        return message, 0
    kept = [item for item in items if _fits(item, MAX_ITEM_DEPTH)]
    if len(kept) == len(items):
        return message, 0
    return {**message, field: kept}, len(items) - len(kept)


def _fits(value: Any, room: int) -> bool:
    """Whether `value` nests no deeper than `room` levels (a scalar: none)."""
    if type(value) is dict:
        return room > 0 and all(_fits(v, room - 1) for v in value.values())
    if type(value) is list:
        return room > 0 and all(_fits(v, room - 1) for v in value)
    return True
