"""The reference partner client over real HTTP: a scripted server on loopback in this process
(tests/support/loopback.py), and the partner stub's own app served the same way."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from email.utils import formatdate

import orjson
import pytest

from common.config import Settings
from devtools.partner_stub import create_stub_app
from tests.support import sample
from tests.support.loopback import Answer, ScriptedServer, serve
from workers.mapping import plan_message
from workers.partner.base import Operation, OperationKind, PartnerResult
from workers.partner.reference import ReferencePartnerClient

API_KEY = "sk-live-0123456789abcdef0123456789abcdef"


@pytest.fixture
def server() -> ScriptedServer:
    return ScriptedServer()


@pytest.fixture
def base_url(server: ScriptedServer) -> Iterator[str]:
    with serve(server.app) as url:
        yield url


def _client(base_url: str, timeout: float = 5.0) -> ReferencePartnerClient:
    return ReferencePartnerClient(base_url, timeout)


def _op(kind: OperationKind = OperationKind.EVENTS, audience_id: int | None = None) -> Operation:
    return Operation(kind, {"account_id": 7, "batches": [{"n": 2**63 - 1}]}, API_KEY, audience_id, "m-1")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("kind", "method", "path"),
    [
        (OperationKind.EVENTS, "POST", "/v1/events"),
        (OperationKind.AUDIENCE_UPSERT, "PUT", "/v1/audiences/77"),
        (OperationKind.AUDIENCE_DELETE, "DELETE", "/v1/audiences/77"),
        (OperationKind.MEMBERS, "POST", "/v1/audiences/77/members"),
        (OperationKind.ERASE, "DELETE", "/v1/users"),
    ],
)
def test_each_kind_goes_to_its_route_with_key_idempotency_and_json(
    server: ScriptedServer, base_url: str, kind: OperationKind, method: str, path: str
) -> None:
    op = _op(kind, audience_id=None if kind in (OperationKind.EVENTS, OperationKind.ERASE) else 77)
    result = _client(base_url).send(op, "idem-123")
    assert result == PartnerResult(200)
    [got] = server.received
    assert (got.method, got.path) == (method, path)
    assert got.headers["Authorization"] == f"Bearer {API_KEY}"
    assert got.headers["Idempotency-Key"] == "idem-123"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == "firehose-relay"
    # Byte for byte what orjson makes of the payload: a 64-bit id survives exactly.
    assert got.body == orjson.dumps(op.payload)
    assert orjson.loads(got.body)["batches"][0]["n"] == 2**63 - 1


def test_a_base_url_with_a_path_and_trailing_slash_is_joined_once(server: ScriptedServer, base_url: str) -> None:
    _client(base_url + "/partner/").send(_op(), "k")
    assert [r.path for r in server.received] == ["/partner/v1/events"]


def test_from_settings_takes_url_and_timeout() -> None:
    slow = ReferencePartnerClient.from_settings(
        Settings(partner_api_url="http://127.0.0.1:9/api/", partner_timeout_seconds=30)
    )
    quick = ReferencePartnerClient.from_settings(Settings(partner_timeout_seconds=0.5))
    assert slow.base_url == "http://127.0.0.1:9/api"
    # Connecting is capped at ~3 s whatever the read budget: a dead host fails fast.
    assert slow.timeout == (3.05, 30.0)
    assert quick.timeout == (0.5, 0.5)


def test_an_error_answer_keeps_a_short_excerpt_without_the_api_key(server: ScriptedServer, base_url: str) -> None:
    # The key straddles the 200-character cut: redacting after cutting would leave a fragment.
    server.answers = [Answer(401, "x" * 190 + f"bad key {API_KEY} " + "y" * 5000)]
    result = _client(base_url).send(_op(), "k")
    assert result.status == 401 and result.retry_after is None
    assert result.error is not None and result.error.startswith("HTTP 401: xxx")
    assert len(result.error) <= len("HTTP 401: ") + 200
    assert result.error.endswith("bad key [r") and API_KEY[:4] not in result.error


def test_a_2xx_answer_has_no_error(server: ScriptedServer, base_url: str) -> None:
    server.answers = [Answer(202, {"accepted_events": 1})]
    assert _client(base_url).send(_op(), "k") == PartnerResult(202)


def test_a_redirect_is_an_answer_not_followed(server: ScriptedServer, base_url: str) -> None:
    # Following it would hand the bearer key to wherever the Location points.
    server.answers = [Answer(307, "moved", {"Location": "/elsewhere"})]
    result = _client(base_url).send(_op(), "k")
    assert result.status == 307 and result.error == "HTTP 307: moved"
    assert [r.path for r in server.received] == ["/v1/events"]


def test_retry_after_in_seconds(server: ScriptedServer, base_url: str) -> None:
    server.answers = [Answer(429, "slow down", {"Retry-After": "7"})]
    result = _client(base_url).send(_op(), "k")
    assert (result.status, result.retry_after) == (429, 7.0)


def test_retry_after_as_an_http_date(server: ScriptedServer, base_url: str) -> None:
    server.answers = [Answer(503, "", {"Retry-After": formatdate(time.time() + 30, usegmt=True)})]
    result = _client(base_url).send(_op(), "k")
    # The date has whole seconds: up to one is lost to rounding and the round trip.
    assert result.status == 503 and result.retry_after is not None and 28.0 < result.retry_after <= 30.0


def test_an_unreadable_retry_after_is_none(server: ScriptedServer, base_url: str) -> None:
    server.answers = [Answer(429, "", {"Retry-After": "soon"})]
    assert _client(base_url).send(_op(), "k").retry_after is None


def test_a_partner_slower_than_the_timeout_is_no_answer(server: ScriptedServer, base_url: str) -> None:
    server.answers = [Answer(200, "late", delay=0.5)]
    started = time.monotonic()
    result = _client(base_url, timeout=0.2).send(_op(), "k")
    assert result == PartnerResult(None, error="timeout")
    assert time.monotonic() - started < 0.45


def test_nothing_listening_is_a_connection_error() -> None:
    result = _client(f"http://127.0.0.1:{_closed_port()}").send(_op(), "k")
    assert result == PartnerResult(None, error="connection_error")


def test_any_other_request_failure_is_named_by_its_class_only() -> None:
    # No scheme: requests refuses before any I/O; the error text must not carry the URL or key.
    result = _client("partner.example").send(_op(), "k")
    assert result == PartnerResult(None, error="MissingSchema")


def test_the_partner_stub_takes_what_the_mapping_sends() -> None:
    """The client, the mapping and the stub agree on the reference contract (docs/partner-api.md)."""
    messages = [
        orjson.loads(sample("3.2.0", name))
        for name in (
            "EventProcessingRequest_ios.json",
            "AudienceSubscriptionRequest.json",
            "AudienceMembershipChangeRequest.json",
        )
    ]
    messages[2]["account"]["account_settings"]["apiKey"] = "fixture-api-key-3.2.0"
    ops = [op for message in messages for op in plan_message(message).operations]
    assert {op.kind for op in ops} == {OperationKind.EVENTS, OperationKind.AUDIENCE_UPSERT, OperationKind.MEMBERS}
    with serve(create_stub_app()) as url:
        client = _client(url)
        results = [client.send(op, op.idempotency_key()) for op in ops]
        again = client.send(ops[0], ops[0].idempotency_key())
    assert all(r.status is not None and 200 <= r.status < 300 and r.error is None for r in results), results
    # The same key again is the partner's duplicate: still a success, not an error.
    assert again.status is not None and 200 <= again.status < 300
