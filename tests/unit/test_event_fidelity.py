"""Every field of an event batch that a partner may act on reaches it (docs/partner-api.md, events):
consent state and system notifications included, and a batch of notifications without events is
work, not verification traffic. From the parse through the web, the inbox, grouping and one
partner call, in process; and what the partner stub shows of it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from common.keys import Keys
from devtools.partner_stub import api_key_sha256, create_stub_app
from schemas.events import NOTIFICATION_TYPES, MessageInvalid, parse_event_batch
from service import create_app
from tests.support import SAMPLES, sample
from tests.support.partner_api import API_KEY, headers
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import core_runtime, run_inbox, take_inbox
from workers.delivery import attempt_delivery
from workers.grouping import plan_jobs
from workers.mapping import plan_message
from workers.partner.base import OperationKind
from workers.runtime import Runtime

TOKEN = "fidelity-token"
AUTH = {"Authorization": f"Token {TOKEN}"}

# §6.1 field → the key of the partner's batch it travels under (docs/partner-api.md's table).
BATCH_FIELDS = {
    "source_id": "source_id",
    "firehose_version": "firehose_version",
    "source_channel": "source_channel",
    "device_application_stamp": "device_application_stamp",
    "integration_attributes": "integration_attributes",
    "platform_fields": "platform_fields",
    "consent_state": "consent_state",
    "system_notifications": "system_notifications",
    "events": "events",
}


def event_fixtures() -> list[Path]:
    found = sorted(path for path in SAMPLES.glob("*/*.json") if path.name.startswith("EventProcessingRequest"))
    assert len(found) >= 35, f"expected the fixtures at {SAMPLES} (python -m devtools.make_fixtures)"
    return found


def batch_message(**changes: Any) -> dict[str, Any]:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = str(uuid.uuid4())
    message.update(changes)
    return message


def notification_only(*, events_key: bool = False, **changes: Any) -> dict[str, Any]:
    """A 3.2.0 eventless batch: consent changed, the user did nothing else. With `events_key`
    it says `events: []`, else it has no `events` at all (the protocol allows either)."""
    message = batch_message(**changes)
    if events_key:
        message["events"] = []
    else:
        del message["events"]
    return message


def the_batch(message: dict[str, Any]) -> dict[str, Any]:
    plan = plan_message(message)
    [operation] = plan.operations
    assert operation.kind is OperationKind.EVENTS
    [batch] = operation.payload["batches"]
    return batch


# ------------------------------------------------------------------ the mapping


@pytest.mark.parametrize("path", event_fixtures(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_batch_field_of_every_fixture_reaches_the_payload(path: Path) -> None:
    message = json.loads(path.read_bytes())
    batch = the_batch(message)
    for field, key in BATCH_FIELDS.items():
        if field in message:
            assert batch[key] == message[field], (field, path)
    assert batch["message_id"] == message["id"]
    assert batch["timestamp_ms"] == message["timestamp_ms"]
    assert batch["account_id"] == message["account"]["account_id"]
    assert batch["user"]["mpid"] == message.get("mpid")
    # The credential travels as the bearer token, never in the payload.
    assert message["account"]["account_settings"]["apiKey"] not in orjson.dumps(batch).decode()


def test_the_fixtures_carry_consent_wherever_the_protocol_has_it() -> None:
    for path in event_fixtures():
        if path.parent.name == "observed":
            continue  # a production capture, as it came: that partner had no consent permission
        message = json.loads(path.read_bytes())
        assert message["consent_state"]["gdpr_consent_state"], path
        assert {n["type"] for n in message["system_notifications"]} <= NOTIFICATION_TYPES, path
        assert message["system_notifications"] and message["integration_attributes"], path
        assert message["source_id"] and message["device_application_stamp"], path


def test_absent_fields_keep_their_keys() -> None:
    message = batch_message()
    for field in (
        "source_id",
        "device_application_stamp",
        "integration_attributes",
        "platform_fields",
        "consent_state",
        "system_notifications",
    ):
        del message[field]
    batch = the_batch(message)
    assert batch["source_id"] is None and batch["device_application_stamp"] is None
    assert batch["consent_state"] is None and batch["platform_fields"] is None
    assert batch["integration_attributes"] == {} and batch["system_notifications"] == []


@pytest.mark.parametrize("events_key", [False, True], ids=["no-events-key", "empty-events"])
def test_a_notification_only_batch_is_one_partner_operation(events_key: bool) -> None:
    message = notification_only(events_key=events_key)
    batch = the_batch(message)
    assert batch["events"] == []
    assert batch["system_notifications"] == message["system_notifications"]
    assert batch["consent_state"] == message["consent_state"]


def test_a_batch_with_neither_events_nor_notifications_plans_nothing() -> None:
    for message in (notification_only(system_notifications=[]), notification_only(system_notifications=None)):
        assert plan_message(message).operations == []


def test_a_bad_or_unknown_notification_is_left_out_and_counted() -> None:
    good = batch_message()["system_notifications"]
    message = batch_message(
        system_notifications=[
            *good,
            "not an object",
            {"type": "gpp_consent_state", "purpose": "x"},
            {"type": "gdpr_consent_state", "new_gdpr_consent_state": {"consented": True}},  # no purpose
            {"type": "ccpa_consent_state", "new_ccpa_consent_state": {"consented": "yes"}},
        ]
    )
    plan = plan_message(message)
    [batch] = plan.operations[0].payload["batches"]
    assert batch["system_notifications"] == good
    assert plan.skipped == {
        "notification:invalid": 1,
        "notification:unknown_type": 1,
        "notification:invalid:purpose": 1,
        "notification:invalid:new_ccpa_consent_state.consented": 1,
    }
    # Only bad notifications and nothing else: no partner call, but they are counted.
    eventless = notification_only(system_notifications=["not an object"])
    plan = plan_message(eventless)
    assert plan.operations == [] and plan.skipped == {"notification:invalid": 1}


def test_notifications_keep_unknown_keys_and_legacy_timestamps() -> None:
    legacy = json.loads((SAMPLES / "1.x-unversioned" / "EventProcessingRequest.json").read_bytes())
    [notification] = legacy["system_notifications"]
    assert "timestamp" in notification["new_gdpr_consent_state"]  # the pre-1.10 name
    notification["x_future"] = {"kept": True}
    batch = the_batch(legacy)
    assert batch["system_notifications"] == [notification]
    assert batch["consent_state"] == legacy["consent_state"]
    assert batch["firehose_version"] is None


@pytest.mark.parametrize(
    "consent_state",
    [
        "opted in",
        {"gdpr_consent_state": ["marketing"]},
        {"gdpr_consent_state": {"marketing": {"document": "no decision"}}},
        {"ccpa_consent_state": {"data_sale_opt_out": {"consented": "false"}}},
    ],
)
def test_a_malformed_consent_state_fails_the_batch(consent_state: Any) -> None:
    # Events must not travel under a consent snapshot the partner cannot read.
    with pytest.raises(MessageInvalid):
        parse_event_batch(batch_message(consent_state=consent_state))


def test_malformed_platform_fields_or_notification_list_never_reach_the_partner() -> None:
    # Whether such a batch fails or travels without the field is the batch parser's policy for
    # hostile shapes (schemas/events.py); what matters here: the partner never gets the garbage.
    for field, value in (("platform_fields", {"workspace_id": [7001]}), ("system_notifications", {"a": 1})):
        try:
            plan = plan_message(batch_message(**{field: value}))
        except MessageInvalid:
            continue
        [batch] = plan.operations[0].payload["batches"]
        assert batch[field] in (None, []) and batch["events"], field
        assert plan.skipped == {f"invalid:{field}": 1}, field


# ------------------------------------------------------------------ web → inbox → grouping → partner


@pytest.fixture
def rt() -> Runtime:
    return core_runtime(ScriptedPartnerClient())


@pytest.fixture
def web(rt: Runtime) -> FlaskClient:
    """The web on the worker core's Redis and key prefix, so what it stores is what `rt` reads."""
    return create_app(rt.settings.model_copy(update={"auth_tokens": (TOKEN,)})).test_client()


def inbox_ids(rt: Runtime) -> list[str]:
    return [fields[b"id"].decode() for _, fields in rt.redis.xrange(Keys(rt.settings.key_prefix).inbox)]


def test_the_web_queues_a_notification_only_batch_and_not_verification(web: FlaskClient, rt: Runtime) -> None:
    work = [notification_only(), notification_only(events_key=True)]
    verification = [notification_only(system_notifications=[]), notification_only(events_key=True)]
    del verification[1]["system_notifications"]
    for message in work + verification:
        response = web.post("/firehose", data=orjson.dumps(message), headers=AUTH)
        assert response.status_code == 202, response.get_data(as_text=True)
        assert response.get_json()["type"] == "event_processing_response"
    assert inbox_ids(rt) == [m["id"] for m in work]
    # Notifications that are not a list are refused like `events` that are not a list.
    broken = notification_only(system_notifications={"type": "gdpr_consent_state"})
    response = web.post("/firehose", data=orjson.dumps(broken), headers=AUTH)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_envelope"


def test_a_notification_only_batch_is_delivered_from_the_web(web: FlaskClient, rt: Runtime) -> None:
    message = notification_only()
    assert web.post("/firehose", data=orjson.dumps(message), headers=AUTH).status_code == 202
    [(_, decision)] = run_inbox(rt)
    assert decision is not None and decision.action.value == "delivered"
    partner = rt.partner
    assert isinstance(partner, ScriptedPartnerClient)
    [(operation, _)] = partner.calls
    [batch] = operation.payload["batches"]
    assert batch["message_id"] == message["id"]
    assert batch["events"] == []
    assert batch["system_notifications"] == message["system_notifications"]
    assert batch["consent_state"] == message["consent_state"]


def test_a_notification_only_batch_shares_a_call_with_its_keys_other_batches(web: FlaskClient, rt: Runtime) -> None:
    with_events, eventless = batch_message(), notification_only()
    for message in (with_events, eventless):
        assert web.post("/firehose", data=orjson.dumps(message), headers=AUTH).status_code == 202
    [job] = plan_jobs(take_inbox(rt), max_messages=50, max_events=1000)
    assert job.task == "events" and len(job.bodies) == 2
    attempt = attempt_delivery(job.bodies, rt)
    assert len(attempt.delivered) == 2
    partner = rt.partner
    assert isinstance(partner, ScriptedPartnerClient)
    [(operation, _)] = partner.calls
    batches = operation.payload["batches"]
    assert [b["message_id"] for b in batches] == [with_events["id"], eventless["id"]]
    assert [len(b["events"]) for b in batches] == [len(with_events["events"]), 0]
    assert all(b["system_notifications"] == eventless["system_notifications"] for b in batches)


def test_an_eventless_batch_does_not_count_towards_the_event_bound() -> None:
    def entry(n: int, message: dict[str, Any]) -> tuple[bytes, dict[bytes, bytes]]:
        fields = {b"body": orjson.dumps(message), b"type": b"event_processing_request", b"id": message["id"].encode()}
        return f"{1000 + n}-0".encode(), fields

    full = batch_message()  # two events: the bound of 2 is full with it
    entries = [entry(0, full), entry(1, notification_only()), entry(2, notification_only(events_key=True))]
    [job] = plan_jobs(entries, max_messages=50, max_events=2)
    assert len(job.bodies) == 3


# ------------------------------------------------------------------ the partner stub shows it


def stub_batch(message: dict[str, Any]) -> dict[str, Any]:
    return the_batch(message)


def test_the_stub_keeps_each_users_newest_consent_and_every_notification() -> None:
    client = create_stub_app().test_client()
    older, newer = batch_message(), notification_only()
    newer["timestamp_ms"] = older["timestamp_ms"] + 1000
    newer["consent_state"] = {"gdpr_consent_state": {"marketing": {"consented": False}}}
    # The newer snapshot first, as a retry can reorder them: it still wins.
    for message, key in ((newer, "k-2"), (older, "k-1"), (older, "k-1")):
        body = {"batches": [stub_batch(message)]}
        response = client.post("/v1/events", json=body, headers=headers(idempotency_key=key))
        assert response.status_code == 202
    state = client.get("/_stub/state").get_json()
    user = f"{api_key_sha256(API_KEY)}:{older['mpid']}"
    assert state["consent"][user]["consent_state"] == newer["consent_state"]
    assert state["consent"][user]["message_id"] == newer["id"]
    # Each notification once: the repeat of k-1 was answered from memory, not applied again.
    notes = state["notifications"][user]
    assert [n["message_id"] for n in notes] == [newer["id"]] * 2 + [older["id"]] * 2
    assert [n["notification"] for n in notes[:2]] == newer["system_notifications"]
    assert state["eventless_batches"] == 1 and state["event_batches"] == 2


def test_the_stub_refuses_malformed_consent_fields() -> None:
    client = create_stub_app().test_client()
    for change in ({"consent_state": ["yes"]}, {"system_notifications": {"a": 1}}, {"system_notifications": [1]}):
        body = {"batches": [stub_batch(batch_message()) | change]}
        assert client.post("/v1/events", json=body, headers=headers()).status_code == 400
    assert client.get("/_stub/state").get_json()["consent"] == {}
