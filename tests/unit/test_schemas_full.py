"""Unit tests for the worker-side full validation schemas (schemas/{fields,events,
audiences,dsr}.py). Plain unit tests: no Redis, no Flask, no fixtures from conftest.

Every request fixture (tests/fixtures/messages: all version folders plus the
real-world-shaped batch) is parsed, and every request of the SDK's shared sample
corpus too when it is present; then targeted cases pin the leniency rules of
protocol §11.4 and the int64 / settings-value quirks of §3 and §13.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from marshmallow import Schema, ValidationError

from schemas.audiences import parse_membership_change, parse_subscription
from schemas.dsr import parse_dsr, submitted_time_to_ms
from schemas.events import EVENT_TYPES, parse_event_batch
from schemas.fields import (
    IdentitySchema,
    MessageInvalid,
    SettingsMap,
    SettingValue,
    StrictInt,
)
from tests.support import SAMPLES as FIXTURES
from tests.support import every_sample, extra_corpus, sample_id

PARSERS = {
    "event_processing_request": parse_event_batch,
    "audience_subscription_request": parse_subscription,
    "audience_membership_change_request": parse_membership_change,
    "dsr_processing_request": parse_dsr,
}


def _is_parsed_request(path: Path) -> bool:
    """A request this module parses (registration requests are not ours, responses go the
    other way)."""
    return "Request" in path.name and not path.name.startswith("ModuleRegistration")


# The fixtures always; the shared corpus as extra cases when this machine has it.
SAMPLES = [path for path in every_sample() if _is_parsed_request(path)]
CORPORA = [FIXTURES] + ([corpus] if (corpus := extra_corpus()) else [])


def load(relative: str) -> dict[str, Any]:
    return orjson.loads((FIXTURES / relative).read_bytes())


def new_id() -> str:
    return str(uuid.uuid4())


def event(event_type: str = "custom_event", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": event_type,
        "id": new_id(),
        "timestamp_ms": 1714592744066,
    }
    if event_type == "custom_event":
        base["name"] = "evt"
    base.update(extra)
    return base


def batch(events: Any = None, **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "event_processing_request",
        "id": new_id(),
        "timestamp_ms": 1714592744066,
        "firehose_version": "3.2.0",
        "account": {"account_id": 42, "account_settings": {"apiKey": "k"}},
    }
    if events is not None:
        message["events"] = events
    message.update(extra)
    return message


def membership(profiles: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "audience_membership_change_request",
        "id": new_id(),
        "timestamp_ms": 1714592744066,
        "account": {"account_id": 42},
    }
    if profiles is not None:
        message["user_profiles"] = profiles
    return message


# --------------------------------------------------------------------- all samples


@pytest.mark.parametrize("corpus", CORPORA, ids=lambda corpus: "fixtures" if corpus == FIXTURES else "shared")
def test_sample_inventory_is_complete(corpus: Path) -> None:
    # 3 hand-written + 16 ios + 16 android + 1 observed event batches,
    # 19 subscriptions, 19 membership changes, 8 DSR requests (§15.2).
    by_type: dict[str, int] = {}
    for path in sorted(p for p in corpus.glob("*/*.json") if _is_parsed_request(p)):
        msg_type = orjson.loads(path.read_bytes())["type"]
        by_type[msg_type] = by_type.get(msg_type, 0) + 1
    assert by_type == {
        "event_processing_request": 36,
        "audience_subscription_request": 19,
        "audience_membership_change_request": 19,
        "dsr_processing_request": 8,
    }


@pytest.mark.parametrize("path", SAMPLES, ids=[sample_id(p) for p in SAMPLES])
def test_every_request_sample_parses_cleanly(path: Path) -> None:
    message = orjson.loads(path.read_bytes())
    result = PARSERS[message["type"]](message)
    if message.get("id") is not None:
        assert result.message_id == message["id"]
    if message["type"] == "event_processing_request":
        assert result.skipped == []
        assert result.dropped_identities == []
        assert len(result.events) == len(message["events"]) > 0
        # The valid events are the very dicts that came in, in order.
        assert all(a is b for a, b in zip(result.events, message["events"], strict=True))
        assert result.account_id == message["account"]["account_id"]
        assert result.runtime_environment is not None
        assert "identities" not in result.runtime_environment
        if path.parent.name != "observed":  # the production capture has none
            assert result.device_identities
    elif message["type"] == "audience_membership_change_request":
        assert result.skipped == []
        assert len(result.profiles) == len(message["user_profiles"])
        for profile in result.profiles:
            assert profile.audiences
            assert {a.action for a in profile.audiences} <= {
                "add",
                "delete",
                "attribute_update",
            }
            assert profile.user_identities and profile.device_identities
    elif message["type"] == "audience_subscription_request":
        assert (result.audience_id, result.action) == (1234, "add")
        assert result.account_settings
    else:
        assert result.request_type == "erasure"
        assert len(result.identities) == 2
        assert result.submitted_time_ms is not None
        assert result.warnings == []


def test_ios_320_sample() -> None:
    result = parse_event_batch(load("3.2.0/EventProcessingRequest_ios.json"))
    assert [e["id"] for e in result.events] == [
        "81726b30-4ed0-49fb-a35b-41f68de15936",
        "a654b53c-3de2-4e4a-a695-33f3c74e2ad9",
    ]
    assert [e["type"] for e in result.events] == ["custom_event", "product_action"]
    assert all(e["session_id"] == -4006129215533649512 for e in result.events)  # int64 beyond 2**53
    assert result.skipped == []
    assert result.mpid == "-3630682857533423799"
    assert result.message_id == "89c09d55-c444-4e28-a1f0-40319ce574d4"
    assert result.account_id == 40018
    assert result.account_settings["sendRawIdentities"] == "false"
    assert result.timestamp_ms == 1714564800420
    assert result.source_channel == "native"
    assert result.firehose_version == "3.2.0"
    assert len(result.user_identities) == 6
    assert result.partner_identities == [{"type": "fixture_partner_id", "encoding": "raw", "value": "pid-9b3be01f90"}]
    assert [i["type"] for i in result.device_identities] == [
        "ios_advertising_id",
        "ios_vendor_id",
    ]
    assert result.runtime_environment["type"] == "ios"
    assert result.runtime_environment["apple_search_ads_attribution"]  # kept as sent
    assert result.user_attributes["$City"] == "Exampleville"
    assert result.user_attribute_lists == {"interests": ["hiking", "chess"]}
    assert result.platform_fields["dataplan_version"] == 3
    assert len(result.system_notifications) == 2
    assert result.consent_state is not None


def test_observed_production_payload() -> None:
    result = parse_event_batch(load("observed/EventProcessingRequest_iterable_production_2.2.0.json"))
    assert len(result.events) == 5
    assert result.skipped == []
    assert result.mpid == "-8588368046886725739"  # negative int64, kept as a string
    assert result.account_id == 42001
    assert result.account_settings["coerceStringsToScalars"] == "True"
    assert result.account_settings["gcmIntegrationName"] is None
    assert result.user_attributes == {"loves_pizza": "True", "$Mobile": "+1-202-555-0109"}
    assert result.user_attribute_lists == {}
    assert result.runtime_environment == {
        "type": "unknown",
        "screen_height": 0,
        "screen_width": 0,
        "screen_dpi": 0,
        "is_debug": True,
    }
    assert result.device_identities == []
    assert result.source_channel == "partner"
    assert result.firehose_version == "2.2.0"
    assert all(e["session_id"] == 0 for e in result.events)


def test_1x_event_sample_keeps_int64_session_ids() -> None:
    message = load("1.x-unversioned/EventProcessingRequest.json")
    result = parse_event_batch(message)
    assert len(result.events) == 17
    assert result.firehose_version is None
    assert result.events[0]["session_id"] == -2418451766354306214
    assert result.events[15]["session_id"] == -6576809002573660506
    # The hand-written batch holds one of every event type the schemas know.
    assert {e["type"] for e in result.events} == EVENT_TYPES


def test_1x_membership_sample_normalised_to_actions() -> None:
    result = parse_membership_change(load("1.x-unversioned/AudienceMembershipChangeRequest.json"))
    assert not result.verification
    assert result.skipped == []
    first, second = result.profiles
    assert [(a.audience_id, a.action) for a in first.audiences] == [
        (456, "add"),
        (789, "add"),
        (432, "delete"),
        (654, "delete"),
    ]
    assert [(a.audience_id, a.action) for a in second.audiences] == [
        (432, "add"),
        (654, "add"),
        (456, "delete"),
        (789, "delete"),
    ]
    assert first.audiences[0].settings == {"listId": "fixture-list-456"}
    assert first.mpid is None


def test_320_membership_sample() -> None:
    result = parse_membership_change(load("3.2.0/AudienceMembershipChangeRequest.json"))
    (profile,) = result.profiles
    assert profile.mpid == "2368185964418093797"
    assert profile.partner_identities == [{"type": "fixture_partner_id", "encoding": "raw", "value": "pid-1bd63bd2ab"}]
    assert [(a.audience_id, a.action) for a in profile.audiences] == [
        (456, "add"),
        (789, "attribute_update"),
        (654, "delete"),
    ]
    # The spurious `{}` entry (as in the SDK's sample) is dropped silently (§14.10).
    assert profile.audiences[1].user_attributes == [
        {"key": "lifetime_value", "value": "9999999", "list_value": None, "action": "upsert"},
        {"key": "churned", "value": None, "list_value": None, "action": "delete"},
    ]
    assert result.skipped == []


def test_dsr_sample() -> None:
    result = parse_dsr(load("3.2.0/DsrProcessingRequest.json"))
    assert result.request_id == "ced335c4-50db-4140-bdd2-94f8954181b9"
    assert result.request_type == "erasure"
    assert result.submitted_time_ms == 1714564800667  # from 1714564800.667235 s
    assert result.identities == [
        {
            "type": "android_advertising_id",
            "encoding": "raw",
            "value": "395ea2f5-d2bc-4d0d-88f0-8d60b69a7e4f",
        },
        {"type": "email", "encoding": "raw", "value": "fixture.user0005@example.com"},
    ]
    assert (result.regulation, result.api_version) == ("gdpr", "3.0")
    assert result.account_id is None
    assert result.account_settings == {}


# ------------------------------------------------------------------ event batches


def test_unknown_event_type_skipped_and_counted() -> None:
    good1, good2 = event(), event("session_start")
    unknown = event("hologram_event")
    result = parse_event_batch(batch([good1, unknown, good2]))
    assert result.events == [good1, good2]
    (skip,) = result.skipped
    assert (skip.index, skip.event_id, skip.reason) == (
        1,
        unknown["id"],
        "unknown_type",
    )


@pytest.mark.parametrize(
    ("bad_event", "reason"),
    [
        (event(name=5), "invalid:name"),
        (event(timestamp_ms="x"), "invalid:timestamp_ms"),
        (event(timestamp_ms=1.5), "invalid:timestamp_ms"),
        (event(timestamp_ms=True), "invalid:timestamp_ms"),
        (event(id="not-a-uuid"), "invalid:id"),
        (event(session_id="12x"), "invalid:session_id"),  # "123" is coerced (test_shape_rules.py)
        (
            event(location={"latitude": "north", "longitude": 2}),
            "invalid:location.latitude",
        ),
        (event(location="here"), "invalid:location"),
        (event(attributes={"a": {"nested": 1}}), "invalid:attributes"),
        (event(custom_flags=["x"]), "invalid:custom_flags"),
        (event("screen_view"), "invalid:screen_name"),
        (event("push_subscription", action="subscribe"), "invalid:token"),
        (event("application_state_transition"), "invalid:application_state"),
        (event("privacy_setting_change", is_enabled="yes"), "invalid:setting"),
        (event("error", breadcrumbs=[1]), "invalid:breadcrumbs"),
        (
            event("product_action", action="purchase", products=[{"position": "first"}]),
            "invalid:products.position",
        ),
        (
            event("product_action", action="purchase", total_amount="9.99 EUR"),
            "invalid:total_amount",
        ),
        (
            event("promotion_action", action="view", promotions=[{"position": 1}]),
            "invalid:promotions.position",
        ),
        (
            event("user_identity_change", added=[{"type": "email", "encoding": "raw"}]),
            "invalid:added.value",
        ),
        ({"id": new_id(), "timestamp_ms": 1}, "invalid:type"),
        ("not an event", "invalid:event"),
        (None, "invalid:event"),
    ],
)
def test_bad_event_skipped_with_reason(bad_event: Any, reason: str) -> None:
    good = event()
    result = parse_event_batch(batch([good, bad_event]))
    assert result.events == [good]
    (skip,) = result.skipped
    assert skip.index == 1
    assert skip.reason == reason
    assert skip.detail


def test_skipped_event_keeps_its_id() -> None:
    bad = event(name=5)
    (skip,) = parse_event_batch(batch([bad])).skipped
    assert skip.event_id == bad["id"]


@pytest.mark.parametrize("session_id", [-(2**63), 2**63 - 1, -1096377938905861812, 0])
def test_int64_session_id_preserved_exactly(session_id: int) -> None:
    # Through real JSON text, as the worker gets it: orjson yields exact ints.
    raw = orjson.dumps(batch([event(session_id=session_id)]))
    result = parse_event_batch(orjson.loads(raw))
    (parsed,) = result.events
    assert type(parsed["session_id"]) is int
    assert parsed["session_id"] == session_id
    assert orjson.dumps(parsed["session_id"]) == str(session_id).encode()


def test_unknown_enum_values_tolerated() -> None:
    events = [
        event(custom_event_type="brand_new_kind"),
        event("product_action", action="teleport_to_cart"),
        event("promotion_action", action="hover"),
        event("push_subscription", action="resubscribe", token="t"),
        event("application_state_transition", application_state="hibernate"),
        event("privacy_setting_change", setting="ad_personalisation"),
    ]
    result = parse_event_batch(
        batch(
            events,
            source_channel="carrier_pigeon",
            runtime_environment={
                "type": "quantum",
                "identities": [{"type": "neural_id", "encoding": "sha512", "value": "v"}],
            },
            user_identities=[{"type": "other11", "encoding": "raw", "value": "x"}],
        )
    )
    assert result.events == events
    assert result.skipped == []
    assert result.device_identities == [{"type": "neural_id", "encoding": "sha512", "value": "v"}]
    assert result.user_identities[0]["type"] == "other11"
    assert result.runtime_environment == {"type": "quantum"}
    assert result.source_channel == "carrier_pigeon"


def test_unknown_fields_ignored_and_events_untouched() -> None:
    ev = event(brand_new_field={"deep": [1, 2]}, attributes={"n": "1"})
    original = copy.deepcopy(ev)
    message = batch(
        [ev],
        something_new=True,
        account={"account_id": 1, "new_account_field": [1]},
        runtime_environment={"type": "ios", "future_field": {"x": 1}},
        firehose_version="9.9.9",
    )
    result = parse_event_batch(message)
    assert result.events == [original]
    assert result.events[0] is ev
    assert result.runtime_environment == {"type": "ios", "future_field": {"x": 1}}
    assert result.account_settings == {}
    assert result.firehose_version == "9.9.9"


def test_events_missing_or_null_is_empty() -> None:
    for message in (batch(), batch(events=[])):
        result = parse_event_batch(message)
        assert (result.events, result.skipped) == ([], [])
    message = batch()
    message["events"] = None
    assert parse_event_batch(message).events == []


@pytest.mark.parametrize("events", [{"0": {}}, "[]", 5])
def test_events_not_a_list_is_message_invalid(events: Any) -> None:
    with pytest.raises(MessageInvalid) as info:
        parse_event_batch(batch(events))
    assert "events" in info.value.errors
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": "nope"}, "id"),
        ({"id": None}, "id"),
        ({"timestamp_ms": "1"}, "timestamp_ms"),
        ({"account": {"account_id": "42"}}, "account.account_id"),
        ({"account": {"account_id": True}}, "account.account_id"),
        ({"account": {}}, "account.account_id"),
        ({"account": None}, "account"),
        (
            {"account": {"account_id": 1, "account_settings": {"k": {"x": 1}}}},
            "account.account_settings",
        ),
        (
            {"account": {"account_id": 1, "account_settings": ["x"]}},
            "account.account_settings",
        ),
        ({"mpid": True}, "mpid"),
        # A bad user_attributes entry, runtime_environment or identity list is left out and
        # counted instead (tests/unit/test_shape_rules.py).
        ({"type": "audience_subscription_request"}, "type"),
    ],
)
def test_invalid_envelope_is_message_invalid(change: dict[str, Any], field: str) -> None:
    message = batch([event()])
    message.update(change)
    with pytest.raises(MessageInvalid) as info:
        parse_event_batch(message)
    assert field in info.value.errors


def test_missing_account_is_message_invalid() -> None:
    message = batch()
    del message["account"]
    with pytest.raises(MessageInvalid, match="account"):
        parse_event_batch(message)


def test_non_dict_message_is_message_invalid() -> None:
    with pytest.raises(MessageInvalid):
        parse_event_batch([])  # type: ignore[arg-type]


def test_settings_values_accept_strings_null_and_scalars() -> None:
    settings = {
        "flag": "True",
        "unset": None,
        "count": 5,
        "ratio": 1.5,
        "on": True,
        "off": False,
    }
    result = parse_event_batch(
        batch(
            account={"account_id": 7, "account_settings": settings},
            user_attributes={"age": 30},
        )
    )
    assert result.account_settings == {
        "flag": "True",
        "unset": None,
        "count": "5",
        "ratio": "1.5",
        "on": "true",
        "off": "false",
    }
    assert result.user_attributes == {"age": "30"}


def test_event_attributes_accept_scalars() -> None:
    ev = event(attributes={"n": 5, "b": False, "none": None}, custom_flags={"f": "1"})
    result = parse_event_batch(batch([ev]))
    assert result.events == [ev]  # original values kept; coercion is validation only


def test_user_attribute_lists() -> None:
    result = parse_event_batch(batch(user_attribute_lists={"tags": ["a", 1], "none": None}))
    assert result.user_attribute_lists == {"tags": ["a", "1"], "none": None}
    # A list that is not one is left out alone and counted (tests/unit/test_shape_rules.py).
    result = parse_event_batch(batch(user_attribute_lists={"tags": "a", "ok": ["b"]}))
    assert result.user_attribute_lists == {"ok": ["b"]}
    assert result.dropped_fields == ["invalid:user_attribute_lists"]


def test_invalid_identities_dropped_and_counted() -> None:
    message = batch(
        user_identities=[
            {"type": "email", "encoding": "raw", "value": "a@b.c"},
            {"type": "email", "encoding": "raw", "value": ""},
            {"type": "customer", "encoding": "raw"},
            "junk",
        ],
        partner_identities=[{"type": "", "encoding": "raw", "value": "p"}],
    )
    result = parse_event_batch(message)
    assert result.user_identities == [{"type": "email", "encoding": "raw", "value": "a@b.c"}]
    assert result.partner_identities == []
    assert [(d.field, d.index, d.reason) for d in result.dropped_identities] == [
        ("user_identities", 1, "invalid:value"),
        ("user_identities", 2, "invalid:value"),
        ("user_identities", 3, "invalid:identity"),
        ("partner_identities", 0, "invalid:type"),
    ]


def test_every_known_event_type_accepted_minimal() -> None:
    required = {
        "custom_event": {"name": "n"},
        "screen_view": {"screen_name": "s"},
        "privacy_setting_change": {"setting": "app_data_collection"},
        "push_subscription": {"action": "subscribe", "token": "t"},
        "application_state_transition": {"application_state": "install"},
        "product_action": {"action": "purchase"},
        "promotion_action": {"action": "view"},
    }
    events = [{"type": t, "id": new_id(), "timestamp_ms": 2, **required.get(t, {})} for t in sorted(EVENT_TYPES)]
    assert len(EVENT_TYPES) == 16
    result = parse_event_batch(batch(events))
    assert result.skipped == []
    assert len(result.events) == 16


def test_optional_event_fields_may_be_null() -> None:
    ev = event(session_id=None, location=None, source_id=None, attributes=None)
    assert parse_event_batch(batch([ev])).events == [ev]


def test_thousand_event_batch() -> None:
    events = []
    for i in range(1000):
        if i % 2:
            events.append(
                event(
                    "product_action",
                    action="purchase",
                    session_id=-(2**62) - i,
                    products=[{"id": "p", "position": 1, "price": 9.99, "quantity": 2}],
                    attributes={"k": "v"},
                )
            )
        else:
            events.append(event(attributes={"i": str(i)}, location={"latitude": 1, "longitude": 2.5}))
    events[500]["type"] = "unknown_new_type"
    result = parse_event_batch(batch(events))
    assert len(result.events) == 999
    assert [(s.index, s.reason) for s in result.skipped] == [(500, "unknown_type")]


# ---------------------------------------------------------------- subscriptions


def subscription(**extra: Any) -> dict[str, Any]:
    message = {
        "type": "audience_subscription_request",
        "id": new_id(),
        "timestamp_ms": 1,
        "account": {"account_id": 9, "account_settings": {"apiKey": "k"}},
        "audience_id": 1234,
        "audience_name": "Low Engagement",
        "action": "add",
    }
    message.update(extra)
    return message


def test_subscription_actions_and_settings() -> None:
    result = parse_subscription(
        subscription(
            action="update",
            audience_subscription_settings={"listId": "77", "sync": True},
            previous_audience_subscription_settings={"listId": None},
            audience_description="desc",
        )
    )
    assert result.action == "update"
    assert result.settings == {"listId": "77", "sync": "true"}
    assert result.previous_settings == {"listId": None}
    assert result.audience_description == "desc"
    assert parse_subscription(subscription(action="remove")).action == "remove"
    plain = parse_subscription(subscription())
    assert (plain.settings, plain.previous_settings) == ({}, None)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"action": "delete"}, "action"),  # membership vocabulary, not subscription
        ({"action": None}, "action"),
        ({"audience_id": "1234"}, "audience_id"),
        ({"audience_id": None}, "audience_id"),
        (
            {"audience_subscription_settings": {"x": {}}},
            "audience_subscription_settings",
        ),
    ],
)
def test_subscription_invalid(change: dict[str, Any], field: str) -> None:
    message = subscription()
    message.update(change)
    with pytest.raises(MessageInvalid) as info:
        parse_subscription(message)
    assert field in info.value.errors


# ------------------------------------------------------------------ memberships


def test_membership_verification_request() -> None:
    result = parse_membership_change(membership())
    assert result.profiles == []
    assert result.verification
    empty = parse_membership_change(membership([]))
    assert empty.profiles == [] and not empty.verification


def test_membership_bad_entries_skipped_rest_kept() -> None:
    profiles = [
        {
            "mpid": -5227515829034156637,  # a number is turned into its exact text
            "user_identities": [{"type": "email", "encoding": "raw", "value": "a@b.c"}],
            "audiences": [
                {"audience_id": 1, "audience_name": "A", "action": "add"},
                {"audience_id": 2, "audience_name": "B", "action": "remove"},
                {"audience_name": "C", "action": "add"},
                {"audience_id": 4, "audience_name": "D"},
                "junk",
                {
                    "audience_id": 6,
                    "action": "attribute_update",
                    "user_attributes": [
                        {"key": "k", "value": 5, "action": "upsert"},
                        {"key": "tags", "list_value": ["a", "b"], "action": "upsert"},
                        {"key": "x", "action": "merge"},
                        {"value": "no key", "action": "upsert"},
                        {},
                    ],
                },
            ],
        },
        "not a profile",
        {
            "device_identities": "nope",
            "audiences": [{"audience_id": 9, "action": "add"}],
        },
    ]
    result = parse_membership_change(membership(profiles))
    (profile,) = result.profiles
    assert profile.mpid == "-5227515829034156637"
    assert [(a.audience_id, a.action) for a in profile.audiences] == [
        (1, "add"),
        (6, "attribute_update"),
    ]
    assert profile.audiences[1].user_attributes == [
        {"key": "k", "value": "5", "list_value": None, "action": "upsert"},
        {"key": "tags", "value": None, "list_value": ["a", "b"], "action": "upsert"},
    ]
    assert profile.audiences[1].audience_name is None
    assert [(s.path, s.reason, s.audience_id) for s in result.skipped_items] == [
        ("user_profiles[0].audiences[1]", "unknown_action", 2),
        ("user_profiles[0].audiences[2]", "invalid:audience_id", None),
        ("user_profiles[0].audiences[3]", "invalid:action", 4),
        ("user_profiles[0].audiences[4]", "invalid:audience", None),
        ("user_profiles[0].audiences[5].user_attributes[2]", "unknown_action", 6),
        ("user_profiles[0].audiences[5].user_attributes[3]", "invalid:key", 6),
        ("user_profiles[1]", "invalid:profile", None),
        ("user_profiles[2]", "invalid:device_identities", None),
    ]
    # `skipped` is just the reason codes, which the worker counts directly.
    assert result.skipped == [s.reason for s in result.skipped_items]
    assert result.skipped.count("unknown_action") == 2


def test_membership_1x_lists_ignore_action_key() -> None:
    profiles = [
        {
            "added_audiences": [{"audience_id": 1, "audience_name": "A"}],
            "removed_audiences": [{"audience_id": 2, "audience_name": "B", "action": "add"}],
        }
    ]
    (profile,) = parse_membership_change(membership(profiles)).profiles
    assert [(a.audience_id, a.action) for a in profile.audiences] == [
        (1, "add"),
        (2, "delete"),
    ]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"user_profiles": {"0": {}}}, "user_profiles"),
        ({"account": {"account_id": 1.0}}, "account.account_id"),
        ({"id": 12}, "id"),
        ({"type": "event_processing_request"}, "type"),
    ],
)
def test_membership_invalid(change: dict[str, Any], field: str) -> None:
    message = membership([])
    message.update(change)
    with pytest.raises(MessageInvalid) as info:
        parse_membership_change(message)
    assert field in info.value.errors


# ------------------------------------------------------------------------- DSR


def test_dsr_without_envelope_sdk_fixture_shape() -> None:
    # The SDK's test fixture: no id/timestamp/firehose_version, ISO submitted_time,
    # extra mParticle identities under extensions (§10.1).
    message = {
        "type": "dsr_processing_request",
        "subject_request_id": "a7551968-d5d6-44b2-9831-815ac9017798",
        "subject_request_type": "erasure",
        "submitted_time": "2021-11-01T15:00:00Z",
        "subject_identities": {
            "email": {"encoding": "raw", "value": "x@example.com"},
            "android_id": {"value": "aid"},
            "ios_vendor_id": {"encoding": "raw", "value": ""},
        },
        "api_version": "3.0",
        "regulation": "ccpa",
        "extensions": {
            "opendsr.mparticle.com": {
                "skip_waiting_period": False,
                "subject_identities": {
                    "other6": {"encoding": "raw", "value": "o6"},
                    "email": {"encoding": "raw", "value": "x@example.com"},
                },
            }
        },
    }
    result = parse_dsr(message)
    assert result.message_id is None and result.account_id is None
    assert result.submitted_time_ms == 1635778800000
    assert result.identities == [
        {"type": "email", "encoding": "raw", "value": "x@example.com"},
        {"type": "android_id", "encoding": "raw", "value": "aid"},
        {"type": "other6", "encoding": "raw", "value": "o6"},
    ]
    assert [d.reason for d in result.dropped_identities] == ["invalid:value"]
    assert result.regulation == "ccpa"


def test_dsr_with_account_and_bad_time() -> None:
    message = {
        "type": "dsr_processing_request",
        "id": new_id(),
        "account": {"account_id": 5, "account_settings": {"k": "v"}},
        "submitted_time": "last tuesday",
    }
    result = parse_dsr(message)
    assert (result.account_id, result.account_settings) == (5, {"k": "v"})
    assert result.submitted_time_ms is None
    assert result.warnings == ["unparseable:submitted_time"]
    assert result.identities == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": "x"}, "id"),
        ({"account": {"account_id": "5"}}, "account.account_id"),
        ({"subject_identities": "email"}, "subject_identities"),
        ({"subject_request_type": 1}, "subject_request_type"),
    ],
)
def test_dsr_invalid(change: dict[str, Any], field: str) -> None:
    message = {"type": "dsr_processing_request", **change}
    with pytest.raises(MessageInvalid) as info:
        parse_dsr(message)
    assert field in info.value.errors


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2021-11-01T15:00:00Z", 1635778800000),
        ("2021-11-01T15:00:00.123+00:00", 1635778800123),
        ("2021-11-01T15:00:00", 1635778800000),  # naive → UTC
        (1714592744.067235, 1714592744067),  # decimal seconds
        (1688420571.171, 1688420571171),
        (1714592744, 1714592744000),  # small integer → seconds
        (1714592744067, 1714592744067),  # large integer → ms
        ("1714592744.5", 1714592744500),
        ("1714592744067", 1714592744067),
        (None, None),
        (True, None),
        ({"t": 1}, None),
        ("soon", None),
    ],
)
def test_submitted_time_forms(value: Any, expected: int | None) -> None:
    assert submitted_time_to_ms(value) == expected


# ------------------------------------------------------------------------ fields


class _Probe(Schema):
    n = StrictInt()
    s = SettingValue()
    m = SettingsMap()


PROBE = _Probe()


@pytest.mark.parametrize("value", [0, -1, 2**53 + 1, -(2**63), 2**63 - 1, 2**70])
def test_strict_int_accepts_any_int(value: int) -> None:
    assert PROBE.load({"n": value})["n"] == value


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1]])
def test_strict_int_rejects_non_ints(value: Any) -> None:
    with pytest.raises(ValidationError):
        PROBE.load({"n": value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("True", "True"),
        (None, None),
        (5, "5"),
        (-2.5, "-2.5"),
        (True, "true"),
        (False, "false"),
        ("", ""),
    ],
)
def test_setting_value_coercion(value: Any, expected: str | None) -> None:
    assert PROBE.load({"s": value})["s"] == expected
    assert PROBE.load({"m": {"k": value}})["m"] == {"k": expected}


@pytest.mark.parametrize("value", [{}, {"a": 1}, [], ["a"]])
def test_setting_value_rejects_nested(value: Any) -> None:
    with pytest.raises(ValidationError):
        PROBE.load({"s": value})
    with pytest.raises(ValidationError):
        PROBE.load({"m": {"k": value}})


def test_identity_schema() -> None:
    schema = IdentitySchema()
    assert schema.load({"type": "x", "encoding": "y", "value": "z", "extra": 1}) == {
        "type": "x",
        "encoding": "y",
        "value": "z",
    }
    for bad in (
        {"type": "x", "encoding": "y", "value": ""},
        {"type": "x", "encoding": "y", "value": 5},
    ):
        with pytest.raises(ValidationError):
            schema.load(bad)
