"""A big event batch or membership change at the door without its items parsed
(service/message_view.py), and the worker's side of that bargain (workers/repair.py).

The door must answer a big message exactly as a whole parse would, with one exception it states:
inside an item it no longer sees a number past a double's range or nesting past what orjson
writes. Those reach the worker, which reads and sends the rest of the message, skipping and
counting an item it cannot send; none of them fails the message.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from marshmallow import ValidationError

from schemas.envelope import carries_work, load_envelope
from schemas.messages import EVENTS, ITEMS_FIELD, MEMBERSHIP
from service.dispatch import MAX_DEPTH, _too_deep, parse
from service.errors import ApiError
from service.message_view import MIN_BYTES, MessageView, RawItems, view
from tests.support import every_sample, sample_id
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import message as fresh
from tests.support.worker_core import run_inbox, take_inbox
from workers import repair
from workers.runtime import Runtime
from workers.tasks import run_attempt


def _big(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its items repeated until its body is past MIN_BYTES."""
    field = ITEMS_FIELD[message["type"]]
    items = message.get(field) or []
    if not isinstance(items, list) or not items:
        message = dict(message, padding="x" * MIN_BYTES)  # nothing to repeat: a long field instead
        return message
    # The same item objects repeated: orjson writes each in full.
    return dict(message, **{field: items * (MIN_BYTES // len(orjson.dumps(items)) + 1)})


def _big_samples() -> list[Path]:
    out = []
    for path in every_sample():
        try:
            message = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            continue
        if isinstance(message, dict) and message.get("type") in ITEMS_FIELD:
            out.append(path)
    return out


BIG_SAMPLES = _big_samples()


def _door(message: Any) -> Any:
    """Everything the door decides from a parsed message, errors included."""
    out: list[Any] = [_too_deep(message)]
    try:
        out.append(load_envelope(message))
    except ValidationError as exc:
        out.append(("invalid", exc.messages))
    try:
        out.append(carries_work(message.get("type"), message))
    except ValidationError as exc:
        out.append(("invalid", exc.messages))
    return out


def test_there_are_big_samples_of_both_types() -> None:
    kinds = {orjson.loads(p.read_bytes())["type"] for p in BIG_SAMPLES}
    assert kinds == {EVENTS, MEMBERSHIP}


@pytest.mark.parametrize("path", BIG_SAMPLES, ids=sample_id)
def test_the_view_is_the_whole_parse_but_the_items(path: Path) -> None:
    body = orjson.dumps(_big(orjson.loads(path.read_bytes())))
    seen, whole = view(body), orjson.loads(body)
    assert isinstance(seen, MessageView)
    field = seen.items_field
    assert {k: v for k, v in seen.items() if k != field} == {k: v for k, v in whole.items() if k != field}
    if isinstance(whole.get(field), list):
        assert isinstance(seen[field], RawItems) and bool(seen[field]) == bool(whole[field])
        assert [orjson.loads(bytes(raw)) for raw in seen[field]] in ([], [whole[field]])
    assert _door(seen) == _door(whole)


# What the door reads of a big message, each given values of every JSON type and the near misses.
_FIELDS = ["type", "id", "timestamp_ms", "account", "mpid", "consent_state", "system_notifications", "events"]
_VALUES: list[Any] = [None, "x", 7, 2.5, True, [], {}, ["a"], [{}], {"a": [1]}, "  "]


@pytest.mark.parametrize("kind", [EVENTS, MEMBERSHIP])
def test_the_door_decides_the_same_with_the_view_for_every_shape(kind: str) -> None:
    base = _big(fresh(kind, api_key="key-view"))
    fields = [*_FIELDS, ITEMS_FIELD[kind], "user_profiles"]
    cases = [base]
    for name in fields:
        cases.append({k: v for k, v in base.items() if k != name})
        cases += [dict(base, **{name: value}) for value in _VALUES]
    cases.append(dict(base, account=dict(base["account"], account_settings={"apiKey": ""})))
    cases.append(dict(base, account=dict(base["account"], account_settings={"apiKey": 5})))
    cases.append(dict(base, account=dict(base["account"], account_id="12")))
    for case in cases:
        body = orjson.dumps(dict(case, pad="p" * MIN_BYTES))
        seen = view(body)
        assert seen is None or _door(seen) == _door(orjson.loads(body)), case.get("type")


def _item_with(kind: str, raw: bytes) -> bytes:
    """A big message whose second item has a field holding `raw` (bytes put in as they are)."""
    message = _big(fresh(kind, api_key="key-view"))
    field = ITEMS_FIELD[kind]
    message[field][1] = dict(message[field][1], x_field="@@RAW@@")
    return orjson.dumps(message).replace(b'"@@RAW@@"', raw)


# Bodies orjson refuses, the fault inside an item, where msgspec walks without building.
_MALFORMED = {
    "trailing comma": b"[1,]",
    "bad escape": b'"\\q"',
    "lone surrogate": b'"\\ud800"',
    "unpaired low surrogate": b'"\\udc00x"',
    "control character": b'"a\x01b"',
    "NaN": b"NaN",
    "Infinity": b"-Infinity",
    "leading zero": b"01",
    "invalid UTF-8": b'"\xff\xfe"',
    "encoded surrogate": b'"\xed\xa0\x80"',
    "nesting past 1024": b"[" * 1100 + b"]" * 1100,
    "single quotes": b"'x'",
}


@pytest.mark.parametrize("kind", [EVENTS, MEMBERSHIP])
@pytest.mark.parametrize("fault", sorted(_MALFORMED))
def test_a_fault_inside_an_item_gets_the_whole_parse_answer(kind: str, fault: str) -> None:
    body = _item_with(kind, _MALFORMED[fault])
    with pytest.raises(orjson.JSONDecodeError) as whole:
        orjson.loads(body)
    with pytest.raises(ApiError) as answer:
        parse(body)
    assert answer.value.status == 400 and answer.value.code == "invalid_json"
    assert answer.value.message == f"Body is not valid JSON: {whole.value.msg}."


def test_a_bom_or_a_body_that_is_not_an_object_is_parsed_whole() -> None:
    body = orjson.dumps(_big(fresh(EVENTS, api_key="key-view")))
    assert view(b"\xef\xbb\xbf" + body) is None
    assert view(b"[" + body + b"]") is None
    assert view(b" \n" + body) is not None  # blanks around a body are JSON's own
    with pytest.raises(ApiError):
        parse(b"\xef\xbb\xbf" + body)


# What the door lets through inside an item now, and the whole parse did not.
_LET_THROUGH = {
    "number past a double": b"1e400",
    "negative number past a double": b"-2.5E+309",
    "integer of 400 digits": b"9" * 400,
    "nesting past MAX_DEPTH": b"[" * 600 + b"]" * 600,
}


@pytest.mark.parametrize("kind", [EVENTS, MEMBERSHIP])
@pytest.mark.parametrize("case", sorted(_LET_THROUGH))
def test_what_the_door_leaves_inside_an_item_to_the_worker(kind: str, case: str) -> None:
    body = _item_with(kind, _LET_THROUGH[case])
    message = parse(body)
    assert isinstance(message, MessageView) and not _too_deep(message)
    # The worker reads it whole (such a number as null).
    assert "x_field" in repair.load_body(body)[ITEMS_FIELD[kind]][1]


@pytest.mark.parametrize("where", ["account", "consent_state", "x_top"])
@pytest.mark.parametrize("case", sorted(_LET_THROUGH))
def test_outside_the_items_the_door_refuses_them_as_before(where: str, case: str) -> None:
    message = _big(fresh(EVENTS, api_key="key-view"))
    message[where] = {"account_id": 1, "deep": "@@RAW@@"} if where == "account" else {"deep": "@@RAW@@"}
    body = orjson.dumps(message).replace(b'"@@RAW@@"', _LET_THROUGH[case])
    if case.startswith("nesting"):
        assert _too_deep(parse(body))
    else:
        with pytest.raises(ApiError) as answer:
            parse(body)
        assert answer.value.status == 400


def test_the_depth_limit_outside_the_items_is_exact() -> None:
    message = _big(fresh(EVENTS, api_key="key-view"))
    for levels in (MAX_DEPTH - 2, MAX_DEPTH - 1):
        message["x_top"] = "@@RAW@@"
        body = orjson.dumps(message).replace(b'"@@RAW@@"', b"[" * levels + b"]" * levels)
        # The message object is one level, the list levels more.
        assert _too_deep(parse(body)) == (levels + 1 > MAX_DEPTH), levels


def test_the_worker_reads_numbers_past_a_double_as_orjson_writes_them() -> None:
    text = '{"a": 1e400, "b": -1E+309, "c": %s, "d": 18446744073709551616, "e": 1.5, "f": 12, "g": [1e-400]}'
    loaded = repair.load_body(text % ("9" * 5000))
    assert loaded == {"a": None, "b": None, "c": None, "d": 18446744073709551616.0, "e": 1.5, "f": 12, "g": [0.0]}
    assert type(loaded["f"]) is int and type(loaded["d"]) is float  # as orjson reads them
    assert repair.load_body('{"a": 18446744073709551615}') == orjson.loads('{"a": 18446744073709551615}')
    for refused in ('{"a": NaN}', '{"a": Infinity}', '{"a": 1,}', '{"a": "\\ud800"', "\xff"):
        with pytest.raises(orjson.JSONDecodeError):
            repair.load_body(refused)


def test_only_the_items_too_deep_to_write_are_left_out() -> None:
    deep: Any = 1
    for _ in range(repair.MAX_ITEM_DEPTH):
        deep = [deep]
    ok = {"a": deep[0]}  # MAX_ITEM_DEPTH levels in all
    too = {"a": deep}
    message = {"type": EVENTS, "events": [ok, too, {"b": 1}]}
    assert repair.without_deep_items(message) == ({"type": EVENTS, "events": [ok, {"b": 1}]}, 1)
    assert repair.without_deep_items({"type": EVENTS, "events": [ok]}) == ({"type": EVENTS, "events": [ok]}, 0)
    assert repair.without_deep_items({"type": "x", "events": [too]})[1] == 0


def _skipped(rt: Runtime) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in rt.redis.hgetall(rt.keys.skipped_events).items()}


def _letters(rt: Runtime) -> list[str]:
    from common import dead_letters

    return [letter.reason for letter in dead_letters.list_letters(rt.redis, rt.keys)]


@pytest.mark.parametrize("levels", [300, 600])
def test_an_event_too_deep_to_send_is_skipped_and_the_rest_delivered(
    rt: Runtime, partner: ScriptedPartnerClient, levels: int
) -> None:
    message = fresh(EVENTS, api_key="key-deep", events=3)
    message["events"][1]["x_field"] = "@@RAW@@"
    message["events"][2]["custom_attributes"] = {"big": "@@NUM@@"}
    body = orjson.dumps(message).replace(b'"@@RAW@@"', b"[" * levels + b"1" + b"]" * levels)
    body = body.replace(b'"@@NUM@@"', b"1e400")
    run_attempt([body.decode()], 1, None, grouped=False, rt=rt)
    assert _letters(rt) == [] and take_inbox(rt) == []
    [(op, _)] = partner.calls
    sent = op.payload["batches"][0]["events"]
    assert [e["id"] for e in sent] == [message["events"][0]["id"], message["events"][2]["id"]]
    assert _skipped(rt).get(repair.UNSERIALISABLE) == 1


def test_a_membership_change_with_what_the_door_left_unread_is_delivered(
    rt: Runtime, partner: ScriptedPartnerClient
) -> None:
    # A membership change sends only the fields its schema knows, each checked: a deep or
    # out-of-range value elsewhere in a profile is read and left behind, never sent.
    message = fresh(MEMBERSHIP, api_key="key-deep")
    profiles = message["user_profiles"]
    assert profiles
    deep = copy.deepcopy(profiles[0])
    deep["x_field"] = "@@RAW@@"
    deep["x_number"] = "@@NUM@@"
    message["user_profiles"] = [*profiles, deep]
    body = orjson.dumps(message).replace(b'"@@RAW@@"', b"[" * 600 + b"]" * 600).replace(b'"@@NUM@@"', b"1e400")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    run_attempt([body.decode()], 1, None, grouped=False, rt=rt)
    run_inbox(rt)  # the units of a change for several audiences (workers/units.py)
    assert _letters(rt) == [] and take_inbox(rt) == []
    # One call per audience, every profile in it.
    assert len(partner.calls) == len({a["audience_id"] for p in profiles for a in p["audiences"]})
