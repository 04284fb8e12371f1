"""Tests of the partner stub (devtools/partner_stub), the relay's default partner.

Most tests run the stub for real, as the end-to-end tests do: a subprocess on
loopback, spoken to over HTTP. A few unit tests use the Flask test client for
cases that need a fresh app or precise control (seeded faults, latency).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from devtools.partner_stub import api_key_sha256, create_stub_app

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE_S = 15.0
HTTP_TIMEOUT_S = 5.0
API_KEY = "test-api-key-0001"
OTHER_API_KEY = "test-api-key-0002"


# --- running the stub as a subprocess --------------------------------------------


class RunningStub:
    def __init__(self, proc: subprocess.Popen[str], base_url: str, stderr_path: Path) -> None:
        self.proc = proc
        self.base_url = base_url
        self.stderr_path = stderr_path

    def url(self, path: str) -> str:
        return self.base_url + path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(timeout=5)
        return self.proc.returncode


def start_stub(tmp_dir: Path, extra_env: dict[str, str] | None = None) -> RunningStub:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUB_")}
    env.update(extra_env or {})
    env["PYTHONUNBUFFERED"] = "1"
    stderr_path = tmp_dir / f"stub-{uuid.uuid4().hex[:8]}.stderr"
    # stderr goes to a file: an unread pipe would fill up and block the stub.
    with open(stderr_path, "wb") as stderr_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devtools.partner_stub",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
    # readline() has no timeout, so read on a thread and bound the wait here.
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP_DEADLINE_S)
    except queue.Empty:
        proc.kill()
        proc.wait(timeout=5)
        pytest.fail(f"stub did not start in {STARTUP_DEADLINE_S}s: {stderr_path.read_text()}")
    prefix = "partner stub listening on "
    if not line.startswith(prefix):
        proc.kill()
        proc.wait(timeout=5)
        pytest.fail(f"unexpected first line {line!r}; stderr: {stderr_path.read_text()}")
    base_url = line[len(prefix) :].strip()
    assert not base_url.endswith(":0"), "the stub must print the bound port, not 0"
    return RunningStub(proc, base_url, stderr_path)


# Named `partner`, not `stub`: tests/conftest.py has a session `stub` for the
# end-to-end tests, and this module wants a stub of its own it can reset freely.
@pytest.fixture(scope="module")
def partner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStub]:
    running = start_stub(tmp_path_factory.mktemp("partner_stub"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def _fresh_stub(request: pytest.FixtureRequest) -> None:
    # Only the subprocess tests share a stub; each starts from a clean one.
    if "partner" in request.fixturenames:
        running: RunningStub = request.getfixturevalue("partner")
        requests.post(running.url("/_stub/reset"), timeout=HTTP_TIMEOUT_S).raise_for_status()


def headers(api_key: str | None = API_KEY, idempotency_key: str | None = None) -> dict[str, str]:
    result = {"Content-Type": "application/json"}
    if api_key is not None:
        result["Authorization"] = f"Bearer {api_key}"
    result["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
    return result


def events_body(*event_ids: str) -> dict[str, Any]:
    return {
        "batches": [
            {
                "message_id": str(uuid.uuid4()),
                "account_id": 123,
                "timestamp_ms": 1714592744066,
                "source_channel": "native",
                "user": {
                    "mpid": "-5227515829034156637",
                    "user_identities": [{"type": "email", "encoding": "raw", "value": "a@b.c"}],
                    "device_identities": [],
                    "partner_identities": [],
                    "attributes": {"plan": "gold"},
                    "attribute_lists": {"tags": ["x", "y"]},
                },
                "device": {"platform": "iOS"},
                "events": [
                    {
                        "id": event_id,
                        "type": "custom_event",
                        "timestamp_ms": 1714592744066,
                    }
                    for event_id in event_ids
                ],
            }
        ]
    }


def get_json(partner: RunningStub, path: str) -> Any:
    response = requests.get(partner.url(path), timeout=HTTP_TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def user(mpid: str | None = None, email: str | None = None) -> dict[str, Any]:
    identities = [{"type": "email", "encoding": "raw", "value": email}] if email else []
    return {
        "mpid": mpid,
        "user_identities": identities,
        "device_identities": [],
        "partner_identities": [],
    }


# --- subprocess tests ------------------------------------------------------------


def test_events_applied_once_and_repeat_is_a_duplicate(partner: RunningStub) -> None:
    body = events_body("ev-1", "ev-2")
    hdrs = headers(idempotency_key="batch-key-1")

    first = requests.post(partner.url("/v1/events"), json=body, headers=hdrs, timeout=HTTP_TIMEOUT_S)
    assert first.status_code == 202
    assert first.json() == {"accepted_events": 2}

    repeat = requests.post(partner.url("/v1/events"), json=body, headers=hdrs, timeout=HTTP_TIMEOUT_S)
    assert repeat.status_code == 202
    assert repeat.json() == {"accepted_events": 2}

    state = get_json(partner, "/_stub/state")
    assert state["events"] == {"ev-1": 1, "ev-2": 1}
    assert state["event_batches"] == 1
    assert state["duplicates"] == 1
    assert state["idempotency_conflicts"] == 0

    log = get_json(partner, "/_stub/requests?path_prefix=/v1/events")["requests"]
    assert [r["duplicate"] for r in log] == [False, True]
    assert [r["seq"] for r in log] == sorted(r["seq"] for r in log)
    assert all(r["status"] == 202 and r["idempotency_key"] == "batch-key-1" for r in log)
    assert log[0]["api_key_sha256"] == hashlib.sha256(API_KEY.encode()).hexdigest()
    assert log[0]["body"] == body
    assert isinstance(log[0]["received_at"], float)


def test_request_log_and_stderr_never_show_the_api_key(partner: RunningStub) -> None:
    requests.post(
        partner.url("/v1/events"),
        json=events_body("ev-s"),
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    ).raise_for_status()
    raw = requests.get(partner.url("/_stub/requests"), timeout=HTTP_TIMEOUT_S).text
    assert API_KEY not in raw
    assert api_key_sha256(API_KEY) in raw
    assert API_KEY not in partner.stderr_path.read_text()
    assert "ev-s" not in partner.stderr_path.read_text()  # no bodies in logs either


def test_audience_lifecycle_and_membership_view(partner: RunningStub) -> None:
    key_sha = api_key_sha256(API_KEY)
    audience_key = f"{key_sha}:4242"

    created = requests.put(
        partner.url("/v1/audiences/4242"),
        json={
            "account_id": 1,
            "name": "High value",
            "description": None,
            "settings": {"list": "a"},
        },
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    )
    assert created.status_code == 200
    assert created.json() == {"audience_id": 4242}

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
    applied = requests.post(
        partner.url("/v1/audiences/4242/members"),
        json={"account_id": 1, "changes": changes},
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    )
    assert applied.status_code == 200
    assert applied.json() == {"applied": 6}

    state = get_json(partner, "/_stub/state")
    audience = state["audiences"][audience_key]
    assert audience["name"] == "High value"
    assert audience["settings"] == {"list": "a"}
    assert audience["deleted"] is False
    assert state["members"][audience_key] == {
        "111": {"attributes": {"tier": "gold"}},
        "email:x@example.com": {"attributes": {}},
    }

    deleted = requests.delete(partner.url("/v1/audiences/4242"), headers=headers(), timeout=HTTP_TIMEOUT_S)
    assert deleted.status_code == 200
    state = get_json(partner, "/_stub/state")
    assert state["audiences"][audience_key]["deleted"] is True
    assert audience_key not in state["members"]

    # Deleting an audience the partner never saw is still a success.
    unknown = requests.delete(partner.url("/v1/audiences/999"), headers=headers(), timeout=HTTP_TIMEOUT_S)
    assert unknown.status_code == 200


def test_member_add_creates_audience_implicitly_and_keys_are_per_customer(
    partner: RunningStub,
) -> None:
    body = {
        "account_id": 1,
        "changes": [{"action": "add", "timestamp_ms": 1, "user": user(mpid="7")}],
    }
    for api_key in (API_KEY, OTHER_API_KEY):
        response = requests.post(
            partner.url("/v1/audiences/55/members"),
            json=body,
            headers=headers(api_key=api_key),
            timeout=HTTP_TIMEOUT_S,
        )
        assert response.status_code == 200

    state = get_json(partner, "/_stub/state")
    for api_key in (API_KEY, OTHER_API_KEY):
        audience_key = f"{api_key_sha256(api_key)}:55"
        assert state["audiences"][audience_key]["deleted"] is False
        assert state["audiences"][audience_key]["implicit"] is True
        assert state["members"][audience_key] == {"7": {"attributes": {}}}


def test_erasure(partner: RunningStub) -> None:
    identities = [{"type": "email", "encoding": "raw", "value": "gone@example.com"}]
    response = requests.delete(
        partner.url("/v1/users"),
        json={
            "account_id": 1,
            "request_id": "dsr-1",
            "regulation": "gdpr",
            "identities": identities,
        },
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    )
    assert response.status_code == 202
    erased = get_json(partner, "/_stub/state")["erased"]
    assert len(erased) == 1
    assert erased[0]["request_id"] == "dsr-1"
    assert erased[0]["identities"] == identities


def test_fault_rule_503_twice_then_success(partner: RunningStub) -> None:
    rules = {"rules": [{"path_prefix": "/v1/events", "status": 503, "times": 2, "retry_after": "2"}]}
    installed = requests.post(partner.url("/_stub/faults"), json=rules, timeout=HTTP_TIMEOUT_S)
    assert installed.status_code == 200

    body = events_body("ev-f")
    hdrs = headers(idempotency_key="retry-key")
    statuses = []
    for _ in range(3):
        response = requests.post(partner.url("/v1/events"), json=body, headers=hdrs, timeout=HTTP_TIMEOUT_S)
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "2"
    assert statuses == [503, 503, 202]

    state = get_json(partner, "/_stub/state")
    assert state["events"] == {"ev-f": 1}
    # A faulted attempt was never answered 2xx, so the success is not a duplicate.
    assert state["duplicates"] == 0

    log = get_json(partner, "/_stub/requests")["requests"]
    assert [r["status"] for r in log] == [503, 503, 202]
    assert [r["fault"] for r in log] == [True, True, False]

    rule = get_json(partner, "/_stub/faults")["rules"][0]
    assert rule["remaining"] == 0
    assert rule["expired"] is True


def test_faults_only_hit_matching_paths(partner: RunningStub) -> None:
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
    requests.post(partner.url("/_stub/faults"), json=rules, timeout=HTTP_TIMEOUT_S).raise_for_status()
    put = requests.put(
        partner.url("/v1/audiences/1"),
        json={"name": "a"},
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    )
    assert put.status_code == 429
    assert "Retry-After" not in put.headers
    events = requests.post(
        partner.url("/v1/events"),
        json=events_body("ev-ok"),
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    )
    assert events.status_code == 202


def test_missing_bearer_is_401(partner: RunningStub) -> None:
    missing = requests.post(
        partner.url("/v1/events"),
        json=events_body("e"),
        headers=headers(api_key=None),
        timeout=HTTP_TIMEOUT_S,
    )
    assert missing.status_code == 401
    assert "error" in missing.json()

    empty = requests.post(
        partner.url("/v1/events"),
        json=events_body("e"),
        headers={**headers(), "Authorization": "Bearer "},
        timeout=HTTP_TIMEOUT_S,
    )
    assert empty.status_code == 401
    assert get_json(partner, "/_stub/state")["events"] == {}


def test_bad_json_and_missing_keys_are_400(partner: RunningStub) -> None:
    not_json = requests.post(
        partner.url("/v1/events"),
        data=b"{not json",
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    )
    assert not_json.status_code == 400
    assert "error" in not_json.json()

    for path, method in (
        ("/v1/events", "POST"),
        ("/v1/audiences/1/members", "POST"),
        ("/v1/users", "DELETE"),
    ):
        response = requests.request(
            method,
            partner.url(path),
            json={"account_id": 1},
            headers=headers(),
            timeout=HTTP_TIMEOUT_S,
        )
        assert response.status_code == 400, path
        assert "error" in response.json()

    # A 400 is not remembered: the fixed payload under the same key is applied.
    hdrs = headers(idempotency_key="fixed-later")
    bad = requests.post(
        partner.url("/v1/events"),
        json={"batches": "x"},
        headers=hdrs,
        timeout=HTTP_TIMEOUT_S,
    )
    assert bad.status_code == 400
    good = requests.post(
        partner.url("/v1/events"),
        json=events_body("ev-fixed"),
        headers=hdrs,
        timeout=HTTP_TIMEOUT_S,
    )
    assert good.status_code == 202
    assert get_json(partner, "/_stub/state")["events"] == {"ev-fixed": 1}


def test_reset_clears_requests_state_and_rules(partner: RunningStub) -> None:
    requests.post(
        partner.url("/_stub/faults"),
        json={"rules": [{"status": 500, "times": 5}]},
        timeout=HTTP_TIMEOUT_S,
    ).raise_for_status()
    requests.post(
        partner.url("/v1/events"),
        json=events_body("ev-r"),
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    )
    requests.post(partner.url("/_stub/faults"), json={"rules": []}, timeout=HTTP_TIMEOUT_S).raise_for_status()
    requests.post(
        partner.url("/v1/events"),
        json=events_body("ev-r"),
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    ).raise_for_status()
    requests.post(
        partner.url("/_stub/faults"),
        json={"rules": [{"status": 500}]},
        timeout=HTTP_TIMEOUT_S,
    )

    reset = requests.post(partner.url("/_stub/reset"), timeout=HTTP_TIMEOUT_S)
    assert reset.status_code == 200

    assert get_json(partner, "/_stub/requests") == {"requests": []}
    assert get_json(partner, "/_stub/faults") == {"rules": []}
    state = get_json(partner, "/_stub/state")
    assert state["events"] == {}
    assert state["event_batches"] == 0
    assert state["audiences"] == {}
    assert state["erased"] == []
    after = requests.post(
        partner.url("/v1/events"),
        json=events_body("ev-r"),
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    )
    assert after.status_code == 202


def test_faults_from_env_and_clean_sigterm(tmp_path: Path) -> None:
    faults = {"rules": [{"path_prefix": "/v1/users", "status": 500, "times": 1}]}
    running = start_stub(tmp_path, {"STUB_FAULTS": json.dumps(faults)})
    try:
        assert get_json(running, "/_stub/faults")["rules"][0]["status"] == 500
        body = {"request_id": "r", "identities": []}
        first = requests.delete(
            running.url("/v1/users"),
            json=body,
            headers=headers(),
            timeout=HTTP_TIMEOUT_S,
        )
        second = requests.delete(
            running.url("/v1/users"),
            json=body,
            headers=headers(),
            timeout=HTTP_TIMEOUT_S,
        )
        assert (first.status_code, second.status_code) == (500, 202)
    finally:
        returncode = running.stop()
    assert returncode == 128 + signal.SIGTERM


def test_bad_fault_file_fails_startup(tmp_path: Path) -> None:
    faults_file = tmp_path / "faults.json"
    faults_file.write_text(json.dumps({"rules": [{"status": 503, "retry-after": "1"}]}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools.partner_stub",
            "--port",
            "0",
            "--faults",
            str(faults_file),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=STARTUP_DEADLINE_S,
        check=False,
    )
    assert proc.returncode == 2
    assert "retry-after" in proc.stderr
    assert proc.stdout == ""


# --- in-process unit tests -----------------------------------------------------------


def client_for(faults: dict[str, Any] | None = None) -> FlaskClient:
    return create_stub_app({"faults": faults}).test_client()


def post_events(client: FlaskClient, *event_ids: str, idempotency_key: str | None = None) -> int:
    response = client.post(
        "/v1/events",
        json=events_body(*event_ids),
        headers=headers(idempotency_key=idempotency_key),
    )
    return response.status_code


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
    assert client.get("/_stub/state").get_json()["events"] == {"slow": 1}


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
    assert state["events"] == {"one": 1}
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
    audience = client.put("/v1/audiences/3", json={"name": "x"}, headers=headers(idempotency_key="k"))
    assert audience.status_code == 200
    state = client.get("/_stub/state").get_json()
    assert state["events"] == {"one": 2}
    assert state["duplicates"] == 0


def test_request_without_idempotency_key_is_applied_every_time() -> None:
    client = client_for()
    hdrs = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(2):
        assert client.post("/v1/events", json=events_body("n"), headers=hdrs).status_code == 202
    assert client.get("/_stub/state").get_json()["events"] == {"n": 2}


def test_wrong_content_type_and_event_without_id_are_400() -> None:
    client = client_for()
    hdrs = {**headers(), "Content-Type": "text/plain"}
    assert client.post("/v1/events", data=json.dumps(events_body("x")), headers=hdrs).status_code == 400
    no_id = {"batches": [{"events": [{"type": "custom_event"}]}]}
    assert client.post("/v1/events", json=no_id, headers=headers()).status_code == 400
    member_without_identity = {"changes": [{"action": "add", "user": user()}]}
    response = client.post("/v1/audiences/1/members", json=member_without_identity, headers=headers())
    assert response.status_code == 400
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
    assert state["events"] == {"race": 1}
    assert state["duplicates"] == 7
