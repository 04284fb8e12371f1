"""The endpoint through Flask's test client, against the real Redis."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import orjson
import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient

from common.config import Settings
from common.keys import Keys
from common.marks import Marks
from service import create_app
from tests.support import sample

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Token {TOKEN}"}


def make_app(redis_url: str, **overrides: object) -> Flask:
    settings = Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=(TOKEN, "next-token"))
    return create_app(settings.model_copy(update=overrides))


@pytest.fixture
def client(redis_url: str) -> FlaskClient:
    return make_app(redis_url).test_client()


def event_batch(**changes: object) -> dict:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = str(uuid.uuid4())
    message.update(changes)
    return message


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body["error"]


def inbox_ids(redis_client: redis_lib.Redis) -> list[str]:
    entries = redis_client.xrange(Keys("fr").inbox)
    return [fields[b"id"].decode() for _, fields in entries]


def test_event_batch_is_stored_before_202(client: FlaskClient, redis_client: redis_lib.Redis) -> None:
    message = event_batch()
    response = client.post("/firehose", data=orjson.dumps(message), headers=AUTH)
    assert response.status_code == 202
    body = response.get_json()
    assert body["type"] == "event_processing_response"
    assert body["firehose_version"] == "3.2.0"
    assert isinstance(body["timestamp_ms"], int)
    uuid.UUID(body["id"])
    assert message["id"] in inbox_ids(redis_client)
    # Stored byte for byte, so 64-bit integers reach the worker unchanged.
    stored = {f[b"id"].decode(): f[b"body"] for _, f in redis_client.xrange(Keys("fr").inbox)}
    assert orjson.loads(stored[message["id"]]) == message


def test_repeated_id_answered_again_but_queued_once(client: FlaskClient, redis_client: redis_lib.Redis) -> None:
    message = event_batch()
    for _ in range(3):
        assert client.post("/firehose", data=orjson.dumps(message), headers=AUTH).status_code == 202
    assert inbox_ids(redis_client).count(message["id"]) == 1
    assert Marks(redis_client, Keys("fr"), 86400).seen(message["id"], message["account"]["account_id"])


def test_int64_values_survive(client: FlaskClient, redis_client: redis_lib.Redis) -> None:
    message = event_batch()
    message["events"][0]["session_id"] = -(2**63)
    message["events"][1]["session_id"] = 2**63 - 1
    raw = orjson.dumps(message)
    assert client.post("/firehose", data=raw, headers=AUTH).status_code == 202
    stored = {f[b"id"].decode(): f[b"body"] for _, f in redis_client.xrange(Keys("fr").inbox)}
    assert stored[message["id"]] == raw


@pytest.mark.parametrize("path", ["/firehose/events", "/firehose/audience/us1"])
def test_any_subpath_routes_to_the_same_handler(client: FlaskClient, path: str) -> None:
    response = client.post(path, data=orjson.dumps(event_batch()), headers=AUTH)
    assert response.status_code == 202


def test_verification_traffic_answered_and_not_queued(client: FlaskClient, redis_client: redis_lib.Redis) -> None:
    # Neither events nor consent notifications (with notifications it is work: test_event_fidelity.py).
    empty = event_batch(events=[], system_notifications=[])
    no_events = event_batch()
    del no_events["events"], no_events["system_notifications"]
    membership = orjson.loads(sample("3.2.0", "AudienceMembershipChangeRequest.json"))
    membership["id"] = str(uuid.uuid4())
    del membership["user_profiles"]
    for message, status, response_type in [
        (empty, 202, "event_processing_response"),
        (no_events, 202, "event_processing_response"),
        (membership, 200, "audience_membership_change_response"),
    ]:
        response = client.post("/firehose", data=orjson.dumps(message), headers=AUTH)
        assert response.status_code == status
        assert response.get_json()["type"] == response_type
        assert message["id"] not in inbox_ids(redis_client)
    assert response.get_json()["suspend_subscription"] is False


def test_lenient_where_mparticle_is(client: FlaskClient) -> None:
    message = event_batch(firehose_version="9.9.9", brand_new_field={"x": 1})
    message["events"].append({"type": "hologram_event", "id": str(uuid.uuid4()), "timestamp_ms": 1})
    message["account"]["account_settings"]["flag"] = "True"
    message["account"]["account_settings"]["unset"] = None
    assert client.post("/firehose", data=orjson.dumps(message), headers=AUTH).status_code == 202


def test_registration_needs_no_token(client: FlaskClient) -> None:
    response = client.post("/firehose", data=sample("3.2.0", "ModuleRegistrationRequest.json"))
    assert response.status_code == 200
    body = response.get_json()
    assert body["type"] == "module_registration_response"
    assert body["firehose_version"] == body["sdk_version"] == "3.2.0"


@pytest.mark.parametrize(
    "header",
    [None, "", "Token", "Token wrong", f"Bearer {TOKEN}", f"Basic {TOKEN}", f"Token {TOKEN}x"],
)
def test_missing_or_wrong_token_is_401(client: FlaskClient, redis_client: redis_lib.Redis, header: str | None) -> None:
    message = event_batch()
    headers = {} if header is None else {"Authorization": header}
    error = assert_error(client.post("/firehose", data=orjson.dumps(message), headers=headers), 401, "unauthorized")
    assert TOKEN not in str(error)
    assert message["id"] not in inbox_ids(redis_client)


def test_every_listed_token_is_accepted_for_rotation(client: FlaskClient) -> None:
    for token in (TOKEN, "next-token"):
        response = client.post(
            "/firehose", data=orjson.dumps(event_batch()), headers={"Authorization": f"Token {token}"}
        )
        assert response.status_code == 202


def test_no_token_is_open_only_by_the_explicit_opt_out(redis_url: str) -> None:
    opted_out = make_app(redis_url, auth_tokens=(), auth_disabled=True)
    assert opted_out.test_client().post("/firehose", data=orjson.dumps(event_batch())).status_code == 202


@pytest.mark.parametrize("tokens", [(), ("",), (" ",)])
def test_no_token_without_the_opt_out_lets_nothing_in(redis_url: str, tokens: tuple[str, ...]) -> None:
    # An app built without the start check (web=False: the worker entry, a CLI) still fails closed.
    client = create_app(
        Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=tokens), web=False
    ).test_client()
    for headers in ({}, {"Authorization": "Token "}, {"Authorization": "Token  "}):
        assert_error(client.post("/firehose", data=orjson.dumps(event_batch()), headers=headers), 401, "unauthorized")


def test_a_token_wins_over_the_opt_out(redis_url: str) -> None:
    client = make_app(redis_url, auth_disabled=True).test_client()
    assert_error(client.post("/firehose", data=orjson.dumps(event_batch())), 401, "unauthorized")
    assert client.post("/firehose", data=orjson.dumps(event_batch()), headers=AUTH).status_code == 202


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b"\xff\xfe{}", b'{"a": NaN}', b'{"type": Infinity}', b"[" * 2000 + b"]" * 2000],
)
def test_unparseable_json_is_400(client: FlaskClient, body: bytes) -> None:
    assert_error(client.post("/firehose", data=body, headers=AUTH), 400, "invalid_json")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": "not-a-uuid"}, "id"),
        ({"id": 5}, "id"),
        ({"timestamp_ms": "1714592744066"}, "timestamp_ms"),
        ({"timestamp_ms": 1.5}, "timestamp_ms"),
        ({"timestamp_ms": True}, "timestamp_ms"),
        ({"account": None}, "account"),
        ({"account": {"account_settings": {}}}, "account"),
        ({"account": {"account_id": "123"}}, "account"),
        ({"events": {"not": "a list"}}, "events"),
    ],
)
def test_invalid_envelope_is_400_with_fields(client: FlaskClient, change: dict, field: str) -> None:
    message = event_batch(**change)
    error = assert_error(client.post("/firehose", data=orjson.dumps(message), headers=AUTH), 400, "invalid_envelope")
    assert field in error["fields"]


def test_missing_envelope_fields_are_400(client: FlaskClient) -> None:
    message = event_batch()
    for field in ("id", "timestamp_ms", "account"):
        broken = dict(message)
        del broken[field]
        error = assert_error(client.post("/firehose", data=orjson.dumps(broken), headers=AUTH), 400, "invalid_envelope")
        assert field in error["fields"]
    error = assert_error(client.post("/firehose", data=b"[1, 2]", headers=AUTH), 400, "invalid_envelope")
    error = assert_error(client.post("/firehose", data=b'{"id": "x"}', headers=AUTH), 400, "invalid_envelope")
    assert "type" in error["fields"]


def test_unknown_type_is_400(client: FlaskClient) -> None:
    message = event_batch(type="teleport_request")
    assert_error(client.post("/firehose", data=orjson.dumps(message), headers=AUTH), 400, "unknown_type")


def test_response_type_sent_as_input_is_400(client: FlaskClient) -> None:
    body = sample("3.2.0", "EventProcessingResponse.json")
    assert_error(client.post("/firehose", data=body, headers=AUTH), 400, "unsupported_type")


def test_oversize_body_is_413(redis_url: str) -> None:
    client = make_app(redis_url, max_body_bytes=10_000).test_client()
    message = event_batch()
    message["padding"] = "x" * 20_000
    assert_error(client.post("/firehose", data=orjson.dumps(message), headers=AUTH), 413, "payload_too_large")


def test_404_and_405_are_json(client: FlaskClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")
    error = client.get("/firehose")
    assert_error(error, 405, "method_not_allowed")
    assert "POST" in error.headers["Allow"]


def test_redis_refusing_is_503_not_2xx(redis_url: str) -> None:
    port = _closed_port()
    client = make_app(f"redis://127.0.0.1:{port}/0").test_client()
    response = client.post("/firehose", data=orjson.dumps(event_batch()), headers=AUTH)
    assert_error(response, 503, "unavailable")
    assert response.headers["Retry-After"] == "1"


@pytest.fixture
def silent_redis() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: Redis hung, not down."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    for sock in accepted:
        sock.close()
    server.close()


def test_redis_hanging_is_503_within_the_budget(silent_redis: int) -> None:
    client = make_app(f"redis://127.0.0.1:{silent_redis}/0", ingest_redis_timeout_ms=60).test_client()
    started = time.monotonic()
    response = client.post("/firehose", data=orjson.dumps(event_batch()), headers=AUTH)
    elapsed = time.monotonic() - started
    assert_error(response, 503, "unavailable")
    # Not a timing assertion on speed: only that the request did not hang on Redis.
    assert elapsed < 5


def test_readiness_follows_redis(redis_url: str) -> None:
    assert make_app(redis_url).test_client().get("/readyz").status_code == 200
    down = make_app(f"redis://127.0.0.1:{_closed_port()}/0").test_client()
    assert down.get("/readyz").status_code == 503
    assert down.get("/healthz").status_code == 200


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
