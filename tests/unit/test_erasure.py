"""Erasure the partner can match (docs/partner-api.md, "Erasure"): a DSR's OpenDSR identities
reach the partner under the type names and encodings the same user's events carry, with
`submitted_time` in epoch milliseconds; the stub finds and erases that user's events by them.
In process: the mapping, the worker core with a scripted partner client, the stub's Flask app.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from devtools.partner_stub import api_key_sha256, create_stub_app
from schemas.dsr import EVENT_IDENTITY_ENCODINGS, OPENDSR_TO_FIREHOSE, event_side_identities, hash_identity_value
from service.registration import DEFAULTS_FILE, registration_for
from tests.support import sample
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import core_settings
from workers.delivery import attempt_delivery
from workers.mapping import plan_message
from workers.partner.base import Operation, OperationKind
from workers.runtime import Runtime, build_runtime

API_KEY = "erasure-key"
MPID = "-5227515829034156637"
EMAIL = "Jane.Doe@Example.com"
GAID = "84aae47d-d376-4a35-bde5-c0ee5a808bd3"
CUSTOMER = "c-4711"

# Every OpenDSR identity type §10.1 lists.
OPENDSR_TYPES = (
    "controller_customer_id",
    "android_advertising_id",
    "android_id",
    "email",
    "fire_advertising_id",
    "ios_advertising_id",
    "ios_vendor_id",
    "microsoft_advertising_id",
    "microsoft_publisher_id",
    "roku_publisher_id",
    "roku_advertising_id",
)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def dsr(
    subject: dict[str, str],
    extension: dict[str, str] | None = None,
    submitted_time: Any = 1714592744.067235,
    api_key: str = API_KEY,
) -> dict[str, Any]:
    """A DSR erasure in OpenDSR form: raw values, {type: {encoding, value}}."""
    message = orjson.loads(sample("3.2.0", "DsrProcessingRequest.json"))
    message["id"] = str(uuid.uuid4())
    message["account"] = {"account_id": 99, "account_settings": {"apiKey": api_key}}
    message["subject_identities"] = {kind: {"encoding": "raw", "value": value} for kind, value in subject.items()}
    if extension is not None:
        message["extensions"] = {
            "opendsr.mparticle.com": {
                "subject_identities": {kind: {"encoding": "raw", "value": value} for kind, value in extension.items()}
            }
        }
    if submitted_time is None:
        message.pop("submitted_time", None)
    else:
        message["submitted_time"] = submitted_time
    return message


def events_message(mpid: str, email: str, gaid: str, customer: str, api_key: str = API_KEY) -> dict[str, Any]:
    """An event batch as mParticle sends it under our registration: email sha256 (trimmed,
    lower-cased first), customer and the Google advertising id raw."""
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_android.json"))
    message["id"] = str(uuid.uuid4())
    message["account"]["account_settings"]["apiKey"] = api_key
    message["mpid"] = mpid
    message["user_identities"] = [
        {"type": "email", "encoding": "sha256", "value": sha256(email.strip().lower())},
        {"type": "customer", "encoding": "raw", "value": customer},
    ]
    message["runtime_environment"]["identities"] = [{"type": "google_advertising_id", "encoding": "raw", "value": gaid}]
    template = message["events"][0]
    message["events"] = [dict(template, id=str(uuid.uuid4())) for _ in range(2)]
    return message


def erase_payload(message: dict[str, Any]) -> Operation:
    [op] = plan_message(message).operations
    assert op.kind is OperationKind.ERASE
    return op


def triples(identities: list[dict[str, str]]) -> set[tuple[str, str, str]]:
    return {(i["type"], i["encoding"], i["value"]) for i in identities}


# ------------------------------------------------------------------------------ the table


def test_the_encodings_are_what_the_registration_asks_events_to_carry() -> None:
    # The default registration (a REGISTRATION_FILE may lay other permissions over it).
    permissions = json.loads(DEFAULTS_FILE.read_text(encoding="utf-8"))["permissions"]
    registered = {p["type"]: p["encoding"] for p in permissions["device_identities"] + permissions["user_identities"]}
    assert registered == EVENT_IDENTITY_ENCODINGS
    # Every renamed type lands on a registered Firehose type.
    assert set(OPENDSR_TO_FIREHOSE.values()) <= set(EVENT_IDENTITY_ENCODINGS)


IDENTITY_CASES = [
    ("controller_customer_id", "customer", "raw", CUSTOMER),
    ("android_advertising_id", "google_advertising_id", "raw", GAID),
    ("android_id", "android_id", "raw", "e9398229d2a4a075"),
    ("email", "email", "sha256", sha256("jane.doe@example.com")),
    ("ios_advertising_id", "ios_advertising_id", "raw", "DE19F1E9-E582-48EF-9A1C-DB2AE7B97479"),
    ("ios_vendor_id", "ios_vendor_id", "raw", "223537F7-A8AC-40D1-8E4D-633B78BB1072"),
    # Events never carry these (not registered): as received, under the OpenDSR name.
    ("fire_advertising_id", "fire_advertising_id", "raw", "fire-1"),
    ("microsoft_advertising_id", "microsoft_advertising_id", "raw", "ms-ad-1"),
    ("microsoft_publisher_id", "microsoft_publisher_id", "raw", "ms-pub-1"),
    ("roku_publisher_id", "roku_publisher_id", "raw", "roku-pub-1"),
    ("roku_advertising_id", "roku_advertising_id", "raw", "roku-ad-1"),
]


@pytest.mark.parametrize(
    ("opendsr", "firehose", "encoding", "value"),
    IDENTITY_CASES,
)
def test_every_opendsr_type_maps_as_the_table_says(opendsr: str, firehose: str, encoding: str, value: str) -> None:
    raw = {
        "controller_customer_id": CUSTOMER,
        "android_advertising_id": GAID,
        "email": EMAIL,
        "android_id": "e9398229d2a4a075",
        "ios_advertising_id": "DE19F1E9-E582-48EF-9A1C-DB2AE7B97479",
        "ios_vendor_id": "223537F7-A8AC-40D1-8E4D-633B78BB1072",
    }.get(opendsr, value)
    op = erase_payload(dsr({opendsr: raw}))
    assert op.payload["identities"] == [{"type": firehose, "encoding": encoding, "value": value}]


def test_the_parametrized_table_covers_every_opendsr_type() -> None:
    # A type §10.1 lists, or one the mapping translates, without a case above would go untested.
    assert {case[0] for case in IDENTITY_CASES} == set(OPENDSR_TYPES)
    assert set(OPENDSR_TO_FIREHOSE) <= set(OPENDSR_TYPES)


@pytest.mark.parametrize(
    "value",
    ["jane.doe@example.com", "Jane.Doe@Example.com", "  JANE.DOE@EXAMPLE.COM\n", "\tjane.doe@example.com "],
)
def test_emails_are_hashed_trimmed_and_lowercased_as_mparticle_does(value: str) -> None:
    expected = hashlib.sha256(b"jane.doe@example.com").hexdigest()
    assert hash_identity_value(value, "sha256") == expected
    assert expected == expected.lower() and len(expected) == 64


def test_extension_identities_follow_the_same_rules_and_duplicates_go_once() -> None:
    message = dsr(
        {"email": EMAIL},
        extension={"mpid": MPID, "mobile_number": " +49 170 1234567 ", "other6": "o6", "email": EMAIL.lower()},
    )
    assert erase_payload(message).payload["identities"] == [
        {"type": "email", "encoding": "sha256", "value": sha256("jane.doe@example.com")},
        {"type": "mpid", "encoding": "raw", "value": MPID},
        {"type": "mobile_number", "encoding": "sha256", "value": sha256("+49 170 1234567")},
        {"type": "other6", "encoding": "raw", "value": "o6"},
    ]


def test_a_value_already_hashed_passes_and_one_in_another_hash_is_sent_as_received() -> None:
    identities = [
        {"type": "email", "encoding": "sha256", "value": sha256("a@b.c")},
        {"type": "email", "encoding": "md5", "value": hashlib.md5(b"a@b.c").hexdigest()},
        {"type": "android_advertising_id", "encoding": "sha1", "value": "ab" * 20},
    ]
    result, mismatched = event_side_identities(identities)
    assert result == [
        identities[0],
        identities[1],
        {"type": "google_advertising_id", "encoding": "sha1", "value": "ab" * 20},
    ]
    assert mismatched == 2


def test_a_mismatched_encoding_is_counted() -> None:
    message = dsr({})
    message["subject_identities"] = {"email": {"encoding": "md5", "value": "0" * 32}}
    plan = plan_message(message)
    assert plan.skipped == {"dsr_identity_encoding_mismatch": 1}
    assert plan.operations[0].payload["identities"] == [{"type": "email", "encoding": "md5", "value": "0" * 32}]


# ------------------------------------------------------------------------ submitted_time


@pytest.mark.parametrize(
    ("submitted_time", "expected"),
    [
        ("2021-11-01T15:00:00Z", 1635778800000),  # the SDK's test fixture: ISO-8601
        (1714592744.067235, 1714592744067),  # generated samples: decimal epoch seconds
        (1714592744067, 1714592744067),  # the javadoc: epoch milliseconds
        (1714592744, 1714592744000),  # a small integer is seconds
    ],
)
def test_submitted_time_is_forwarded_in_epoch_ms(submitted_time: Any, expected: int) -> None:
    plan = plan_message(dsr({"email": EMAIL}, submitted_time=submitted_time))
    assert plan.operations[0].payload["submitted_time_ms"] == expected
    assert plan.skipped == {}


@pytest.mark.parametrize("submitted_time", ["last tuesday", {"t": 1}, True, 1e300, -1714592744, ""])
def test_an_unreadable_submitted_time_is_left_out_and_counted(submitted_time: Any) -> None:
    plan = plan_message(dsr({"email": EMAIL}, submitted_time=submitted_time))
    [op] = plan.operations
    assert "submitted_time_ms" not in op.payload
    assert op.payload["identities"]  # the erasure still goes out
    assert plan.skipped == {"unparseable:submitted_time": 1}


def test_no_submitted_time_is_left_out_and_not_counted() -> None:
    plan = plan_message(dsr({"email": EMAIL}, submitted_time=None))
    assert "submitted_time_ms" not in plan.operations[0].payload and plan.skipped == {}


def test_request_id_and_regulation_are_forwarded_as_before() -> None:
    message = dsr({"email": EMAIL})
    op = erase_payload(message)
    assert op.payload["request_id"] == message["subject_request_id"]
    assert (op.payload["regulation"], op.payload["account_id"], op.api_key) == ("gdpr", 99, API_KEY)
    assert op.message_id == message["id"] and op.audience_id is None


# ------------------------------------------------------------- events and erasure agree


def test_the_erasure_names_the_user_as_their_events_do() -> None:
    [events_op] = plan_message(events_message(MPID, EMAIL, GAID, CUSTOMER)).operations
    user = events_op.payload["batches"][0]["user"]
    event_side = triples(user["user_identities"] + user["device_identities"]) | {("mpid", "raw", user["mpid"])}
    erasure = dsr(
        {"email": f" {EMAIL.upper()} ", "android_advertising_id": GAID, "controller_customer_id": CUSTOMER},
        extension={"mpid": MPID},
    )
    assert triples(erase_payload(erasure).payload["identities"]) == event_side


# ---------------------------------------------------------- through the worker core


def test_the_worker_sends_the_mapped_erasure_and_counts_an_unreadable_time(
    rt: Runtime, partner: ScriptedPartnerClient
) -> None:
    message = dsr({"email": EMAIL, "android_advertising_id": GAID}, submitted_time="soon")
    result = attempt_delivery([orjson.dumps(message).decode()], rt)
    assert len(result.delivered) == 1
    [(op, key)] = partner.calls
    assert op.kind is OperationKind.ERASE and key == erase_payload(message).idempotency_key()
    assert triples(op.payload["identities"]) == {
        ("email", "sha256", sha256("jane.doe@example.com")),
        ("google_advertising_id", "raw", GAID),
    }
    assert "submitted_time_ms" not in op.payload
    assert rt.redis.hget(rt.keys.skipped_events, "unparseable:submitted_time") == b"1"


def test_the_erasure_follows_the_registration_in_effect(partner: ScriptedPartnerClient, tmp_path: Path) -> None:
    """A REGISTRATION_FILE that asks events to carry other encodings (email sha1, the customer id
    sha256, the Google advertising id md5) changes the erasure's encodings with them: the worker
    encodes as the registration the web answers mParticle with, not as the default one."""
    permissions = {
        "user_identities": [
            {"type": "customer", "encoding": "sha256"},
            {"type": "email", "encoding": "sha1"},
        ],
        "device_identities": [{"type": "google_advertising_id", "encoding": "md5"}],
    }
    registration_file = tmp_path / "registration.json"
    registration_file.write_text(json.dumps({"permissions": permissions}), encoding="utf-8")
    settings = core_settings(registration_file=str(registration_file))
    # The document the web answers with, for the same settings, asks for exactly these.
    answered = registration_for(settings)["permissions"]
    assert answered["user_identities"] == permissions["user_identities"]
    runtime = build_runtime(settings, partner=partner)
    try:
        message = dsr(
            {"email": EMAIL, "controller_customer_id": CUSTOMER, "android_advertising_id": GAID, "android_id": "a1"}
        )
        assert len(attempt_delivery([orjson.dumps(message).decode()], runtime).delivered) == 1
    finally:
        runtime.redis.close()
    [(op, _)] = partner.calls
    assert triples(op.payload["identities"]) == {
        ("email", "sha1", hashlib.sha1(b"jane.doe@example.com").hexdigest()),
        ("customer", "sha256", sha256(CUSTOMER)),
        ("google_advertising_id", "md5", hashlib.md5(GAID.encode()).hexdigest()),
        # No longer requested for events by this registration: sent as received.
        ("android_id", "raw", "a1"),
    }
    # The default registration's encodings, for the same message, are not these.
    assert triples(erase_payload(message).payload["identities"]) != triples(op.payload["identities"])


# ------------------------------------------------------------------------- the stub


@pytest.fixture
def stub() -> FlaskClient:
    return create_stub_app({}).test_client()


def send(stub: FlaskClient, op: Operation) -> int:
    method, path = {OperationKind.EVENTS: ("POST", "/v1/events"), OperationKind.ERASE: ("DELETE", "/v1/users")}[op.kind]
    response = stub.open(
        path,
        method=method,
        json=op.payload,
        headers={"Authorization": f"Bearer {op.api_key}", "Idempotency-Key": op.idempotency_key()},
    )
    return response.status_code


def stub_state(stub: FlaskClient) -> dict[str, Any]:
    return stub.get("/_stub/state").get_json()


def test_the_stub_erases_the_users_events_found_by_the_mapped_identities(stub: FlaskClient) -> None:
    jane = events_message(MPID, EMAIL, GAID, CUSTOMER)
    john = events_message("42", "john@example.com", "11111111-2222-3333-4444-555555555555", "c-1")
    other_key = events_message(MPID, EMAIL, GAID, CUSTOMER, api_key="another-customer")
    for message in (jane, john, other_key):
        [op] = plan_message(message).operations
        assert send(stub, op) == 202
    jane_ids = {e["id"] for e in jane["events"]}

    # OpenDSR form, email only (raw, mixed case): it must still find Jane's sha256 email.
    erasure = dsr({"email": EMAIL}, submitted_time="2021-11-01T15:00:00Z")
    assert send(stub, erase_payload(erasure)) == 202

    state = stub_state(stub)
    ours = state["events_by_api_key"][api_key_sha256(API_KEY)]
    assert jane_ids.isdisjoint(ours) and jane_ids.isdisjoint(state["events"])
    assert {e["id"] for e in john["events"]} <= set(ours)
    # The same user under another customer's API key is that customer's, not erased.
    assert {e["id"] for e in other_key["events"]} <= set(state["events_by_api_key"][api_key_sha256("another-customer")])
    [erased] = state["erased"]
    assert set(erased["erased_events"]) == jane_ids
    assert erased["request_id"] == erasure["subject_request_id"] and erased["submitted_time_ms"] == 1635778800000


@pytest.mark.parametrize(
    "identity",
    [
        {"type": "android_advertising_id", "encoding": "raw", "value": GAID},  # the OpenDSR name
        {"type": "email", "encoding": "raw", "value": EMAIL},  # not the events' encoding
    ],
)
def test_the_stub_finds_nobody_by_the_opendsr_form(stub: FlaskClient, identity: dict[str, str]) -> None:
    [op] = plan_message(events_message(MPID, EMAIL, GAID, CUSTOMER)).operations
    assert send(stub, op) == 202
    payload = {"account_id": 99, "request_id": "dsr-nobody", "regulation": "gdpr", "identities": [identity]}
    erasure = Operation(OperationKind.ERASE, payload, API_KEY)
    assert send(stub, erasure) == 202
    state = stub_state(stub)
    assert len(state["events"]) == 2 and state["erased"][0]["erased_events"] == []


def test_the_stub_erases_matching_audience_members(stub: FlaskClient) -> None:
    member = {"mpid": MPID, "user_identities": [], "device_identities": [], "partner_identities": []}
    body = {
        "account_id": 99,
        "audience": {"name": None, "settings": {}},
        "changes": [{"action": "add", "timestamp_ms": 1, "user": member}],
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert stub.post("/v1/audiences/7/members", json=body, headers=headers).status_code == 200
    erasure = erase_payload(dsr({"email": EMAIL}, extension={"mpid": MPID}))
    assert send(stub, erasure) == 202
    state = stub_state(stub)
    assert state["members"][f"{api_key_sha256(API_KEY)}:7"] == {}
    assert state["erased"][0]["erased_members"] == 1
