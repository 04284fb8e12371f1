"""The partner stub's logic (devtools/partner_stub), in this process through Flask's test client:
idempotency bookkeeping, fault rules, audiences, erasure and request validation. Each test gets a
fresh app, so no state is shared. (The stub as a process, its startup, its log and SIGTERM:
tests/e2e/test_partner_stub.py.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from devtools.partner_stub import api_key_sha256, create_stub_app
from tests.support.partner_api import API_KEY, OTHER_API_KEY, eid, events_body, headers, user

# The stub checks every body against the contract's schemas (devtools/partner_stub/schemas/), so the
# bodies here are whole: event ids are UUIDs (eid), every batch key is there, and so on.


def audience_body(name: str | None = "High value", settings: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"account_id": 1, "name": name, "description": None, "settings": settings or {}, "previous_settings": None}


def members_body(*changes: dict[str, Any]) -> dict[str, Any]:
    return {"account_id": 1, "audience": {"name": None, "settings": {}}, "changes": list(changes)}


def client_for(faults: dict[str, Any] | None = None) -> FlaskClient:
    return create_stub_app({"faults": faults}).test_client()


@pytest.fixture
def client() -> FlaskClient:
    return client_for()


def get_json(client: FlaskClient, path: str) -> Any:
    response = client.get(path)
    assert response.status_code == 200, path
    return response.get_json()


def post_events(client: FlaskClient, *event_ids: str, idempotency_key: str | None = None) -> int:
    response = client.post(
        "/v1/events",
        json=events_body(*event_ids),
        headers=headers(idempotency_key=idempotency_key),
    )
    return response.status_code


# --- idempotency, audiences, erasure ---------------------------------------------------


def test_events_applied_once_and_repeat_is_a_duplicate(client: FlaskClient) -> None:
    body = events_body("ev-1", "ev-2")
    hdrs = headers(idempotency_key="batch-key-1")

    first = client.post("/v1/events", json=body, headers=hdrs)
    assert first.status_code == 202
    assert first.get_json() == {"accepted_events": 2}

    repeat = client.post("/v1/events", json=body, headers=hdrs)
    assert repeat.status_code == 202
    assert repeat.get_json() == {"accepted_events": 2}

    state = get_json(client, "/_stub/state")
    assert state["events"] == {eid("ev-1"): 1, eid("ev-2"): 1}
    assert state["event_batches"] == 1
    assert state["duplicates"] == 1
    assert state["idempotency_conflicts"] == 0

    log = get_json(client, "/_stub/requests?path_prefix=/v1/events")["requests"]
    assert [r["duplicate"] for r in log] == [False, True]
    assert [r["seq"] for r in log] == sorted(r["seq"] for r in log)
    assert all(r["status"] == 202 and r["idempotency_key"] == "batch-key-1" for r in log)
    assert log[0]["api_key_sha256"] == hashlib.sha256(API_KEY.encode()).hexdigest()
    assert log[0]["body"] == body
    assert isinstance(log[0]["received_at"], float)
    assert log[0]["received_at"] <= log[0]["answered_at"]


def test_audience_lifecycle_and_membership_view(client: FlaskClient) -> None:
    key_sha = api_key_sha256(API_KEY)
    audience_key = f"{key_sha}:4242"

    created = client.put("/v1/audiences/4242", json=audience_body(settings={"list": "a"}), headers=headers())
    assert created.status_code == 200
    assert created.get_json() == {"audience_id": 4242}

    changes = [
        {"action": "add", "timestamp_ms": 1, "user": user(mpid="111")},
        {"action": "add", "timestamp_ms": 2, "user": user(email="x@example.com")},
        {"action": "add", "timestamp_ms": 3, "user": user(mpid="333")},
        {
            "action": "update_attributes",
            "timestamp_ms": 4,
            "user": user(mpid="111"),
            "attributes": [
                {
                    "key": "tier",
                    "value": "gold",
                    "list_value": None,
                    "action": "upsert",
                },
                {
                    "key": "tags",
                    "value": None,
                    "list_value": ["a", "b"],
                    "action": "upsert",
                },
            ],
        },
        {
            "action": "update_attributes",
            "timestamp_ms": 5,
            "user": user(mpid="111"),
            "attributes": [{"key": "tags", "value": None, "list_value": None, "action": "delete"}],
        },
        {"action": "delete", "timestamp_ms": 6, "user": user(mpid="333")},
    ]
    applied = client.post("/v1/audiences/4242/members", json=members_body(*changes), headers=headers())
    assert applied.status_code == 200
    assert applied.get_json() == {"applied": 6}

    state = get_json(client, "/_stub/state")
    audience = state["audiences"][audience_key]
    assert audience["name"] == "High value"
    assert audience["settings"] == {"list": "a"}
    assert audience["deleted"] is False
    assert state["members"][audience_key] == {
        "111": {"attributes": {"tier": "gold"}},
        "email:x@example.com": {"attributes": {}},
    }

    deleted = client.delete("/v1/audiences/4242", headers=headers())
    assert deleted.status_code == 200
    state = get_json(client, "/_stub/state")
    assert state["audiences"][audience_key]["deleted"] is True
    assert audience_key not in state["members"]

    # Deleting an audience the partner never saw is still a success.
    unknown = client.delete("/v1/audiences/999", headers=headers())
    assert unknown.status_code == 200


def test_member_add_creates_audience_implicitly_and_keys_are_per_customer(
    client: FlaskClient,
) -> None:
    body = members_body({"action": "add", "timestamp_ms": 1, "user": user(mpid="7")})
    for api_key in (API_KEY, OTHER_API_KEY):
        response = client.post("/v1/audiences/55/members", json=body, headers=headers(api_key=api_key))
        assert response.status_code == 200

    state = get_json(client, "/_stub/state")
    for api_key in (API_KEY, OTHER_API_KEY):
        audience_key = f"{api_key_sha256(api_key)}:55"
        assert state["audiences"][audience_key]["deleted"] is False
        assert state["audiences"][audience_key]["implicit"] is True
        assert state["members"][audience_key] == {"7": {"attributes": {}}}


def test_erasure(client: FlaskClient) -> None:
    identities = [{"type": "email", "encoding": "raw", "value": "gone@example.com"}]
    response = client.delete(
        "/v1/users",
        json={
            "account_id": 1,
            "request_id": "dsr-1",
            "regulation": "gdpr",
            "identities": identities,
        },
        headers=headers(),
    )
    assert response.status_code == 202
    erased = get_json(client, "/_stub/state")["erased"]
    assert len(erased) == 1
    assert erased[0]["request_id"] == "dsr-1"
    assert erased[0]["identities"] == identities


def test_fault_rule_503_twice_then_success(client: FlaskClient) -> None:
    rules = {"rules": [{"path_prefix": "/v1/events", "status": 503, "times": 2, "retry_after": "2"}]}
    installed = client.post("/_stub/faults", json=rules)
    assert installed.status_code == 200

    body = events_body("ev-f")
    hdrs = headers(idempotency_key="retry-key")
    statuses = []
    for _ in range(3):
        response = client.post("/v1/events", json=body, headers=hdrs)
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "2"
    assert statuses == [503, 503, 202]

    state = get_json(client, "/_stub/state")
    assert state["events"] == {eid("ev-f"): 1}
    # A faulted attempt was never answered 2xx, so the success is not a duplicate.
    assert state["duplicates"] == 0

    log = get_json(client, "/_stub/requests")["requests"]
    assert [r["status"] for r in log] == [503, 503, 202]
    assert [r["fault"] for r in log] == [True, True, False]

    rule = get_json(client, "/_stub/faults")["rules"][0]
    assert rule["remaining"] == 0
    assert rule["expired"] is True


def test_faults_only_hit_matching_paths(client: FlaskClient) -> None:
    rules = {
        "rules": [
            {
                "path_prefix": "/v1/audiences",
                "method": "PUT",
                "status": 429,
                "times": None,
            }
        ]
    }
    assert client.post("/_stub/faults", json=rules).status_code == 200
    put = client.put("/v1/audiences/1", json={"name": "a"}, headers=headers())
    assert put.status_code == 429
    assert "Retry-After" not in put.headers
    events = client.post("/v1/events", json=events_body("ev-ok"), headers=headers())
    assert events.status_code == 202


def test_missing_bearer_is_401(client: FlaskClient) -> None:
    missing = client.post("/v1/events", json=events_body("e"), headers=headers(api_key=None))
    assert missing.status_code == 401
    assert "error" in missing.get_json()

    empty = client.post("/v1/events", json=events_body("e"), headers={**headers(), "Authorization": "Bearer "})
    assert empty.status_code == 401
    assert get_json(client, "/_stub/state")["events"] == {}


def test_bad_json_and_missing_keys_are_400(client: FlaskClient) -> None:
    not_json = client.post("/v1/events", data=b"{not json", headers=headers())
    assert not_json.status_code == 400
    assert "error" in not_json.get_json()

    for path, method in (
        ("/v1/events", "POST"),
        ("/v1/audiences/1/members", "POST"),
        ("/v1/users", "DELETE"),
    ):
        response = client.open(path, method=method, json={"account_id": 1}, headers=headers())
        assert response.status_code == 400, path
        assert "error" in response.get_json()

    # A 400 is not remembered: the fixed payload under the same key is applied.
    hdrs = headers(idempotency_key="fixed-later")
    bad = client.post("/v1/events", json={"batches": "x"}, headers=hdrs)
    assert bad.status_code == 400
    good = client.post("/v1/events", json=events_body("ev-fixed"), headers=hdrs)
    assert good.status_code == 202
    assert get_json(client, "/_stub/state")["events"] == {eid("ev-fixed"): 1}


def test_reset_clears_requests_state_and_rules(client: FlaskClient) -> None:
    assert client.post("/_stub/faults", json={"rules": [{"status": 500, "times": 5}]}).status_code == 200
    client.post("/v1/events", json=events_body("ev-r"), headers=headers())
    assert client.post("/_stub/faults", json={"rules": []}).status_code == 200
    assert client.post("/v1/events", json=events_body("ev-r"), headers=headers()).status_code == 202
    client.post("/_stub/faults", json={"rules": [{"status": 500}]})

    reset = client.post("/_stub/reset")
    assert reset.status_code == 200

    assert get_json(client, "/_stub/requests") == {"requests": []}
    assert get_json(client, "/_stub/faults") == {"rules": []}
    state = get_json(client, "/_stub/state")
    assert state["events"] == {}
    assert state["event_batches"] == 0
    assert state["audiences"] == {}
    assert state["erased"] == []
    after = client.post("/v1/events", json=events_body("ev-r"), headers=headers())
    assert after.status_code == 202


# --- fault rules and more bookkeeping ---------------------------------------------------


def test_seeded_probability_is_reproducible() -> None:
    faults = {"rules": [{"status": 503, "probability": 0.5, "seed": 7}]}
    runs = []
    for _ in range(2):
        client = client_for(faults)
        runs.append([post_events(client, f"e{i}") for i in range(20)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {202, 503}


def test_probabilistic_times_counts_firings() -> None:
    client = client_for({"rules": [{"status": 503, "probability": 0.5, "seed": 1, "times": 3}]})
    statuses = [post_events(client, f"e{i}") for i in range(40)]
    assert statuses.count(503) == 3


def test_latency_only_rule_delays_but_applies() -> None:
    client = client_for({"rules": [{"status": None, "latency_ms": 150, "times": 1}]})
    started = time.monotonic()
    assert post_events(client, "slow") == 202
    assert time.monotonic() - started >= 0.15
    assert client.get("/_stub/state").get_json()["events"] == {eid("slow"): 1}


def test_rule_scoped_to_one_api_key() -> None:
    client = client_for({"rules": [{"status": 403, "api_key_sha256": api_key_sha256(OTHER_API_KEY)}]})
    ok = client.post("/v1/events", json=events_body("a"), headers=headers(api_key=API_KEY))
    denied = client.post("/v1/events", json=events_body("b"), headers=headers(api_key=OTHER_API_KEY))
    assert (ok.status_code, denied.status_code) == (202, 403)


def test_invalid_rules_are_rejected() -> None:
    client = client_for()
    for bad in (
        {"rules": [{"status": 503, "retry-after": "1"}]},
        {"rules": [{"status": 1000}]},
        {"rules": [{"probability": 2}]},
        {"rules": [{"times": -1}]},
        {"rule": []},
    ):
        response = client.post("/_stub/faults", json=bad)
        assert response.status_code == 400, bad
    with pytest.raises(ValueError, match="unknown fault rule keys"):
        create_stub_app({"faults": {"rules": [{"stauts": 503}]}})


def test_reused_key_with_different_payload_is_flagged() -> None:
    client = client_for()
    assert post_events(client, "one", idempotency_key="k") == 202
    assert post_events(client, "two", idempotency_key="k") == 202
    state = client.get("/_stub/state").get_json()
    assert state["events"] == {eid("one"): 1}
    assert state["duplicates"] == 1
    assert state["idempotency_conflicts"] == 1


def test_same_key_on_another_route_or_customer_is_not_a_repeat() -> None:
    client = client_for()
    assert post_events(client, "one", idempotency_key="k") == 202
    other = client.post(
        "/v1/events",
        json=events_body("one"),
        headers=headers(api_key=OTHER_API_KEY, idempotency_key="k"),
    )
    assert other.status_code == 202
    audience = client.put("/v1/audiences/3", json=audience_body(), headers=headers(idempotency_key="k"))
    assert audience.status_code == 200
    state = client.get("/_stub/state").get_json()
    assert state["events"] == {eid("one"): 2}
    assert state["duplicates"] == 0


def test_request_without_idempotency_key_is_applied_every_time() -> None:
    client = client_for()
    hdrs = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(2):
        assert client.post("/v1/events", json=events_body("n"), headers=hdrs).status_code == 202
    assert client.get("/_stub/state").get_json()["events"] == {eid("n"): 2}


def test_wrong_content_type_and_event_without_id_are_400() -> None:
    client = client_for()
    hdrs = {**headers(), "Content-Type": "text/plain"}
    assert client.post("/v1/events", data=json.dumps(events_body("x")), headers=hdrs).status_code == 400
    no_id = {"batches": [{"events": [{"type": "custom_event"}]}]}
    assert client.post("/v1/events", json=no_id, headers=headers()).status_code == 400
    # Schema-valid, but names nobody: the one rule the schema cannot say.
    member_without_identity = members_body({"action": "add", "timestamp_ms": 1, "user": user()})
    response = client.post("/v1/audiences/1/members", json=member_without_identity, headers=headers())
    assert response.status_code == 400
    assert "neither an mpid nor any identity" in response.get_json()["error"]
    # Validation is all-or-nothing: nothing was created.
    assert client.get("/_stub/state").get_json()["audiences"] == {}


def test_unknown_v1_route_is_recorded_as_404() -> None:
    client = client_for()
    assert client.post("/v1/nope", json={}, headers=headers()).status_code == 404
    log = client.get("/_stub/requests").get_json()["requests"]
    assert [(r["path"], r["status"]) for r in log] == [("/v1/nope", 404)]


def test_concurrent_repeats_are_applied_once() -> None:
    app = create_stub_app()
    body = events_body("race")
    hdrs = headers(idempotency_key="race-key")
    statuses: list[int] = []

    def send() -> None:
        statuses.append(app.test_client().post("/v1/events", json=body, headers=hdrs).status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert statuses == [202] * 8
    state = app.test_client().get("/_stub/state").get_json()
    assert state["events"] == {eid("race"): 1}
    assert state["duplicates"] == 7


# --- the contract's schemas --------------------------------------------------------------


def test_a_body_off_the_schema_is_a_logged_400_naming_the_problem_not_the_value() -> None:
    client = client_for()
    body = events_body("ev-x")
    batch = body["batches"][0]
    batch["events"][0]["id"] = "secret-customer-value"  # not a UUID
    batch["device"]["platform"] = "iOS"  # device is passed through: any key goes
    del batch["platform_fields"]
    response = client.post("/v1/events", json=body, headers=headers(idempotency_key="off-schema"))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error.startswith("events.schema.json: ")
    assert "batches[0].events[0].id: must match" in error
    assert "batches[0]: 'platform_fields' is a required property" in error
    # The error body can end up in the relay's dead-letter records: no value from the body in it.
    assert "secret-customer-value" not in error
    log = client.get("/_stub/requests").get_json()["requests"]
    assert [(r["status"], r["body"] == body) for r in log] == [(400, True)]
    state = client.get("/_stub/state").get_json()
    assert (state["events"], state["event_batches"]) == ({}, 0)


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("POST", "/v1/events", {"batches": []}, "events.schema.json: batches: fails minItems 1"),
        ("PUT", "/v1/audiences/1", {"name": "x"}, "audience.schema.json: body: 'account_id' is a required property"),
        (
            "POST",
            "/v1/audiences/1/members",
            {"account_id": 1, "audience": {"name": None, "settings": {}}, "changes": [{"action": "attribute_update"}]},
            "changes[0].action: must be one of",
        ),
        ("DELETE", "/v1/users", {"request_id": "r", "identities": []}, "'account_id' is a required property"),
        ("DELETE", "/v1/audiences/1", {"account_id": 1}, "audience.schema.json: body: 'name' is a required property"),
    ],
)
def test_every_route_checks_its_schema(method: str, path: str, body: dict[str, Any], expected: str) -> None:
    client = client_for()
    response = client.open(path, method=method, json=body, headers=headers())
    assert response.status_code == 400
    assert expected in response.get_json()["error"]
    assert client.get("/_stub/state").get_json()["audiences"] == {}


def test_audience_delete_without_a_body_is_accepted_with_one_it_is_checked() -> None:
    client = client_for()
    assert client.delete("/v1/audiences/8", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert client.delete("/v1/audiences/9", json=audience_body(name="Nine"), headers=headers()).status_code == 200
    audiences = client.get("/_stub/state").get_json()["audiences"]
    assert audiences[f"{api_key_sha256(API_KEY)}:9"]["name"] == "Nine"
    assert client.delete("/v1/audiences/9", json=["not", "an", "audience"], headers=headers()).status_code == 400


def test_without_jsonschema_the_stub_warns_and_keeps_its_structural_guards(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The runtime image (docker-compose's partner-stub) has no jsonschema: the stub must still run.
    from devtools.partner_stub.state import load_validators

    monkeypatch.setitem(sys.modules, "jsonschema", None)  # makes `import jsonschema` fail
    load_validators.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="partner_stub"):
            client = client_for()
            assert post_events(client, "unchecked") == 202
            assert client.post("/v1/events", json={"batches": "x"}, headers=headers()).status_code == 400
        assert "NOT checked against the contract schemas" in caplog.text
    finally:
        monkeypatch.undo()
        load_validators.cache_clear()
    assert load_validators() is not None  # the next stub checks again
