"""The request path's envelope check (schemas/envelope.py): its fast path must give exactly what
the schema gives, and leave to the schema every message it would not take as it is."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from marshmallow import ValidationError

from schemas.envelope import _ENVELOPE, _plain_envelope, load_envelope
from tests.support import sample


def _events(**changes: Any) -> dict[str, Any]:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message.update(changes)
    return message


def _with_settings(settings: Any) -> dict[str, Any]:
    message = _events()
    message["account"]["account_settings"] = settings
    return message


def _without_settings() -> dict[str, Any]:
    """Verification traffic (no events, no notifications): without an apiKey it is still answered."""
    message = _events(events=[])
    del message["system_notifications"]
    del message["account"]["account_settings"]
    return message


_KEYED = {"account_id": 1, "account_settings": {"apiKey": "k"}}


def _schema_answer(message: dict[str, Any]) -> Any:
    try:
        return _ENVELOPE.load(copy.deepcopy(message))
    except ValidationError as error:
        return ("error", error.messages)


def _answer(message: dict[str, Any]) -> Any:
    try:
        return load_envelope(message)
    except ValidationError as error:
        return ("error", error.messages)


@pytest.mark.parametrize(
    ("message", "fast"),
    [
        (_events(), True),
        (_without_settings(), True),
        (dict(_without_settings(), account={"account_id": 1, "account_settings": None}), True),
        (_with_settings({"apiKey": "k", "unset": None}), True),
        (_with_settings({"apiKey": 5, "flag": True}), False),  # the schema turns these into text
        (_with_settings(["not", "a", "map"]), False),
        (_events(timestamp_ms="1714564800431"), False),
        (_events(id="not-a-uuid"), False),
        (_events(type="event_processing_response"), False),
        (_events(type="something_new"), False),
        ({"type": "dsr_processing_request", "account": _KEYED}, False),
        ({"type": "event_processing_request"}, False),
    ],
    ids=[
        "plain",
        "no-settings",
        "null-settings",
        "null-setting-value",
        "scalar-settings",
        "settings-not-a-map",
        "string-timestamp",
        "bad-id",
        "response-type",
        "unknown-type",
        "dsr-bare",
        "events-bare",
    ],
)
def test_the_fast_path_answers_exactly_as_the_schema(message: dict[str, Any], fast: bool) -> None:
    assert (_plain_envelope(message) is not None) is fast
    assert _answer(message) == _schema_answer(message)


def test_what_the_schema_answers_for_the_odd_cases() -> None:
    assert load_envelope(_without_settings())["account"]["account_settings"] == {}
    assert load_envelope(_with_settings({"apiKey": 5, "flag": True}))["account"]["account_settings"] == {
        "apiKey": "5",
        "flag": "true",
    }
    # A response type or an unknown type passes the envelope: the caller answers it with its own code.
    assert load_envelope(_events(type="something_new"))["type"] == "something_new"
    # A DSR may come without id and timestamp; an event batch may not.
    assert load_envelope({"type": "dsr_processing_request", "account": _KEYED})["id"] is None
    with pytest.raises(ValidationError) as info:
        load_envelope({"type": "event_processing_request"})
    assert set(info.value.messages) == {"id", "timestamp_ms", "account"}
    # Its envelope may lack the account too (the SDK's samples do), but then it has no apiKey to
    # be delivered with: refused at the door, naming the field, like any message with work.
    with pytest.raises(ValidationError) as info:
        load_envelope({"type": "dsr_processing_request"})
    assert list(info.value.messages) == ["account"]
    assert list(info.value.messages["account"]["account_settings"]) == ["apiKey"]  # type: ignore[index]


def test_the_fast_path_copies_the_settings() -> None:
    message = _events()
    envelope = load_envelope(message)
    envelope["account"]["account_settings"]["apiKey"] = "changed"
    assert message["account"]["account_settings"]["apiKey"] != "changed"
