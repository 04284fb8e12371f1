"""One rule for shape problems: refused at the door (400 naming the field) when nothing could
ever be delivered, else delivered with only the bad part skipped and counted. Never 2xx and then
dead-lettered whole for its shape (docs/architecture.md, "Shape problems")."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from common.config import Settings
from schemas.events import parse_event_batch
from schemas.fields import is_header_value, number_from_text, with_coercions
from service import create_app
from tests.support import sample
from workers.mapping import plan_message

TOKEN = "shape-token"
AUTH = {"Authorization": f"Token {TOKEN}"}


@pytest.fixture
def web(redis_url: str) -> FlaskClient:
    settings = Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=(TOKEN,))
    return create_app(settings).test_client()


def batch(**changes: Any) -> dict[str, Any]:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = str(uuid.uuid4())
    message.update(changes)
    return message


def subscription(**changes: Any) -> dict[str, Any]:
    message = orjson.loads(sample("3.2.0", "AudienceSubscriptionRequest.json"))
    message["id"] = str(uuid.uuid4())
    message.update(changes)
    return message


def product_event(**product: Any) -> dict[str, Any]:
    return {
        "type": "product_action",
        "id": str(uuid.uuid4()),
        "timestamp_ms": 1714592744066,
        "action": "purchase",
        "products": [{"id": "sku", "x_unknown": {"kept": [1]}, **product}],
    }


def refused(web: FlaskClient, message: dict[str, Any]) -> dict[str, Any]:
    response = web.post("/firehose", data=orjson.dumps(message), headers=AUTH)
    assert response.status_code == 400, response.get_data(as_text=True)
    return response.get_json()["error"]


def accepted(web: FlaskClient, message: dict[str, Any]) -> None:
    response = web.post("/firehose", data=orjson.dumps(message), headers=AUTH)
    assert response.status_code in (200, 202), response.get_data(as_text=True)


# ---------------------------------------------------------------- coerced as the SDK does


def test_numeric_strings_in_events_become_numbers_in_the_payload() -> None:
    big = "-1096377938905861812"  # an int64 beyond 2**53: exact, never through a float
    event = product_event(price="10.00", position="1", quantity="2")
    event["session_id"] = big
    plan = plan_message(batch(events=[event]))
    assert plan.skipped == {}
    [sent] = plan.operations[0].payload["batches"][0]["events"]
    assert sent["session_id"] == int(big) and type(sent["session_id"]) is int
    [product] = sent["products"]
    assert product["price"] == 10.0 and product["position"] == 1 and product["quantity"] == 2
    assert product["x_unknown"] == {"kept": [1]}  # unknown fields still travel as sent
    assert event["session_id"] == big  # the original is never changed: a copy is


def test_a_valid_event_travels_as_the_very_same_dict() -> None:
    event = product_event(price=10.5, position=1)
    [sent] = plan_message(batch(events=[event])).operations[0].payload["batches"][0]["events"]
    assert sent is event  # same bytes, same idempotency key as before coercion existed


@pytest.mark.parametrize(
    ("text", "number"),
    [("10.00", 10.0), ("-3", -3), ("1e3", 1000.0), ("9223372036854775807", 2**63 - 1), ("0.5", 0.5)],
)
def test_number_text(text: str, number: float) -> None:
    assert number_from_text(text) == number and type(number_from_text(text)) is type(number)


@pytest.mark.parametrize("text", ["nan", "inf", "1e999", " 1", "1_000", "0x10", "", "10.00 EUR", "+1"])
def test_not_number_text(text: str) -> None:
    assert number_from_text(text) is None


def test_a_non_numeric_string_still_skips_only_its_event() -> None:
    good, bad = product_event(price="1.5"), product_event(price="ten")
    plan = plan_message(batch(events=[good, bad]))
    assert plan.skipped == {"invalid:products.price": 1}
    assert [e["id"] for e in plan.operations[0].payload["batches"][0]["events"]] == [good["id"]]


def test_with_coercions_changes_only_strings_turned_numbers() -> None:
    original = {"a": "1", "b": 5, "c": [{"d": "2"}], "e": {"f": 3}}
    loaded = {"a": 1, "b": "5", "c": [{"d": 2}], "e": {"f": "3"}}
    assert with_coercions(original, loaded) == {"a": 1, "b": 5, "c": [{"d": 2}], "e": {"f": 3}}


# ---------------------------------------------------------------- skipped and counted


def test_a_list_inside_user_attributes_skips_that_attribute_alone() -> None:
    plan = plan_message(batch(user_attributes={"bad": [1], "nested": {"x": 1}, "ok": "yes", "n": 3}))
    user = plan.operations[0].payload["batches"][0]["user"]
    assert user["attributes"] == {"ok": "yes", "n": "3"}
    assert plan.skipped == {"invalid:user_attributes": 2}


def test_a_numeric_source_channel_is_left_out_and_counted() -> None:
    plan = plan_message(batch(source_channel=3))
    sent = plan.operations[0].payload["batches"][0]
    assert sent["source_channel"] is None and sent["events"]
    assert plan.skipped == {"invalid:source_channel": 1}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"user_identities": {"type": "email"}}, "invalid:user_identities"),
        ({"runtime_environment": "ios"}, "invalid:runtime_environment"),
        ({"integration_attributes": {"k": ["x"]}}, "invalid:integration_attributes"),
        ({"user_attribute_lists": {"tags": "a"}}, "invalid:user_attribute_lists"),
        ({"device_application_stamp": 7}, "invalid:device_application_stamp"),
    ],
)
def test_other_batch_field_problems_are_left_out_and_counted(change: dict[str, Any], reason: str) -> None:
    plan = plan_message(batch(**change))
    assert plan.operations and plan.operations[0].payload["batches"][0]["events"]
    assert plan.skipped == {reason: 1}


def test_runtime_identities_that_are_not_a_list_are_left_out() -> None:
    message = batch()
    message["runtime_environment"]["identities"] = {"type": "ios_idfa"}
    parsed = parse_event_batch(message)
    assert parsed.device_identities == [] and parsed.runtime_environment
    assert parsed.dropped_fields == ["invalid:runtime_environment.identities"]


@pytest.mark.parametrize(("mpid", "text"), [(12.0, "12"), (-(2.0**53), str(-(2**53))), ("-5227515829034156637", None)])
def test_an_exact_mpid_is_coerced(web: FlaskClient, mpid: Any, text: str | None) -> None:
    message = batch(mpid=mpid)
    accepted(web, message)
    assert parse_event_batch(message).mpid == (text or mpid)


# ---------------------------------------------------------------- refused at the door


@pytest.mark.parametrize("mpid", [1.5, 2.0**60, True, {"id": 1}, [1]])
def test_an_mpid_that_names_no_user_exactly_is_refused(web: FlaskClient, mpid: Any) -> None:
    error = refused(web, batch(mpid=mpid))
    assert error["code"] == "invalid_envelope" and "mpid" in error["fields"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"action": "rename"}, "action"),
        ({"action": None}, "action"),
        ({"audience_id": "12"}, "audience_id"),
    ],
)
def test_a_subscription_that_is_not_one_is_refused(web: FlaskClient, change: dict[str, Any], field: str) -> None:
    error = refused(web, subscription(**change))
    assert error["code"] == "invalid_envelope" and field in error["fields"]


def test_a_valid_subscription_is_accepted(web: FlaskClient) -> None:
    accepted(web, subscription())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"consent_state": {"gdpr_consent_state": {"m": {"document": "no decision"}}}}, "consent_state"),
        ({"platform_fields": {"workspace_id": [1]}}, "platform_fields"),
        ({"system_notifications": {"a": 1}}, "system_notifications"),
    ],
)
def test_fields_that_fail_the_batch_are_refused_at_the_door(
    web: FlaskClient, change: dict[str, Any], field: str
) -> None:
    assert field in refused(web, batch(**change))["fields"]


@pytest.mark.parametrize("api_key", ["key\r\nX-Injected: 1", "key\nx", "ключ", "key\x00", "key\x7f", "key\x85"])
def test_an_api_key_no_header_can_carry_is_refused(web: FlaskClient, api_key: str) -> None:
    message = batch()
    message["account"]["account_settings"]["apiKey"] = api_key
    error = refused(web, message)
    assert error["fields"] == {
        "account": {"account_settings": {"apiKey": [error["fields"]["account"]["account_settings"]["apiKey"][0]]}}
    }
    assert not is_header_value(api_key)


@pytest.mark.parametrize("api_key", ["plain-key", "with space\tand tab", "café"])
def test_header_safe_api_keys_pass(web: FlaskClient, api_key: str) -> None:
    message = batch()
    message["account"]["account_settings"]["apiKey"] = api_key
    accepted(web, message)


def test_a_body_too_deep_to_write_is_refused_and_one_just_deep_enough_accepted(web: FlaskClient) -> None:
    def body(lists: int) -> bytes:
        # The message object is one level, each list one more: orjson writes at most 254.
        return orjson.dumps(batch(x_deep="DEEP")).replace(b'"DEEP"', b"[" * lists + b"1" + b"]" * lists)

    response = web.post("/firehose", data=body(254), headers=AUTH)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_json" and "254" in error["message"]
    assert web.post("/firehose", data=body(253), headers=AUTH).status_code == 202
