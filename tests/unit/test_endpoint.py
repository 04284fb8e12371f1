"""POST /firehose answered in front of Flask (service/endpoint.py): the same answers as the Flask
view, the same request id, log line and metrics, and everything else left to Flask. In process,
against the suite's real Redis."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder, run_wsgi_app

from common.config import Settings
from common.logging_setup import ContextFilter, log_context
from service import create_app, metrics
from service.endpoint import FirehoseEndpoint
from service.ingest import Ingest
from tests.support import sample

TOKEN = "endpoint-token"
AUTH = {"Authorization": f"Token {TOKEN}"}


@pytest.fixture
def app(redis_url: str) -> Flask:
    return create_app(
        Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=(TOKEN,), key_prefix=f"t{uuid.uuid4().hex[:8]}")
    )


def _message(name: str) -> dict[str, Any]:
    message = orjson.loads(sample("3.2.0", name))
    message["id"] = str(uuid.uuid4())
    return message


def _call(wsgi: Any, body: bytes, path: str = "/firehose", method: str = "POST", **headers: str) -> tuple:
    environ = EnvironBuilder(method=method, path=path, data=body, headers=headers).get_environ()
    app_iter, status, response_headers = run_wsgi_app(wsgi, environ)
    payload = b"".join(app_iter)
    kept = {k: v for k, v in response_headers.items() if k not in ("X-Request-Id", "Content-Length")}
    json = payload and response_headers.get("Content-Type") == "application/json"
    return status, orjson.loads(payload) if json else payload, kept, response_headers.get("X-Request-Id")


def _without_timestamps(answer: Any) -> Any:
    return {k: v for k, v in answer.items() if k not in ("id", "timestamp_ms")} if isinstance(answer, dict) else answer


def _cases() -> list[tuple[str, bytes, dict[str, str], str]]:
    batch, change = _message("EventProcessingRequest_ios.json"), _message("AudienceMembershipChangeRequest.json")
    change["account"]["account_settings"]["apiKey"] = "endpoint-key"
    registration = sample("3.2.0", "ModuleRegistrationRequest.json")
    return [
        ("event batch", orjson.dumps(batch), AUTH, "/firehose"),
        ("membership change", orjson.dumps(change), AUTH, "/firehose"),
        ("under a subpath", orjson.dumps(dict(batch, id=str(uuid.uuid4()))), AUTH, "/firehose/v3/events"),
        ("registration without a token", registration, {}, "/firehose"),
        ("no token", orjson.dumps(batch), {}, "/firehose"),
        ("wrong token", orjson.dumps(batch), {"Authorization": "Token nope"}, "/firehose"),
        ("a stranger's big body", b"x" * 70_000, {}, "/firehose"),
        ("not JSON", b"{nope", AUTH, "/firehose"),
        ("unknown type", b'{"type": "x"}', AUTH, "/firehose"),
        ("a response type", b'{"type": "event_processing_response"}', AUTH, "/firehose"),
        ("an envelope without id", orjson.dumps({k: v for k, v in batch.items() if k != "id"}), AUTH, "/firehose"),
        ("an empty body", b"", AUTH, "/firehose"),
    ]


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_the_endpoint_answers_as_the_flask_view_does(app: Flask, case: int) -> None:
    _, body, headers, path = _cases()[case]
    endpoint = app.wsgi_app
    assert isinstance(endpoint, FirehoseEndpoint)
    fast = _call(endpoint, body, path, **headers)
    flask = _call(endpoint.flask_wsgi, body, path, **headers)
    assert (fast[0], _without_timestamps(fast[1]), fast[2]) == (flask[0], _without_timestamps(flask[1]), flask[2])
    assert fast[3] and flask[3]  # both give the request an id


def test_a_chunked_body_is_answered_by_flask_the_same_way(app: Flask, redis_client: Any) -> None:
    batch = _message("EventProcessingRequest_ios.json")
    body = orjson.dumps(batch)
    builder = EnvironBuilder(method="POST", path="/firehose", headers={**AUTH, "Transfer-Encoding": "chunked"})
    environ = builder.get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = __import__("io").BytesIO(body)
    environ["wsgi.input_terminated"] = True
    app_iter, status, _ = run_wsgi_app(app.wsgi_app, environ)
    assert status.startswith("202") and orjson.loads(b"".join(app_iter))["type"] == "event_processing_response"
    keys = app.extensions["ingest"].keys
    assert [orjson.loads(f[b"body"])["id"] for _, f in redis_client.xrange(keys.inbox)] == [batch["id"]]


def test_the_request_id_is_echoed_or_made_and_bound_to_every_line(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    body = orjson.dumps(_message("EventProcessingRequest_ios.json"))
    client = app.test_client()
    caplog.handler.addFilter(ContextFilter())  # as every configured handler has it
    with caplog.at_level(logging.INFO, logger="service.requests"):
        sent = client.post("/firehose", data=body, headers={**AUTH, "X-Request-Id": "lb-1234"})
        made = client.post("/firehose", data=body, headers={**AUTH, "X-Request-Id": "bad id; drop"})
    assert sent.status_code == made.status_code == 202
    assert sent.headers["X-Request-Id"] == "lb-1234"
    assert made.headers["X-Request-Id"] != "bad id; drop" and len(made.headers["X-Request-Id"]) == 32
    [first, second] = [r for r in caplog.records if getattr(r, "event", None) == "firehose_request"]
    assert (first.request_id, first.status, first.error) == ("lb-1234", 202, None)
    assert (
        first.message_type == "event_processing_request"
        and first.account_id == orjson.loads(body)["account"]["account_id"]
    )
    assert second.request_id == made.headers["X-Request-Id"]
    assert "request_id" not in log_context()  # nothing left bound after the request


def test_an_error_is_on_the_line_and_in_the_metrics(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    before = metrics.REQUESTS.labels("unknown", "401")._value.get()
    with caplog.at_level(logging.INFO, logger="service.requests"):
        response = app.test_client().post("/firehose", data=b'{"type": "x"}')
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Token"
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "firehose_request"]
    assert (line.status, line.error) == (401, "unauthorized")
    assert metrics.REQUESTS.labels("unknown", "401")._value.get() == before + 1


def test_a_fault_of_ours_is_a_json_500_and_a_logged_trace(
    app: Flask, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: Any, **__: Any) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Ingest, "accept", broken)
    body = orjson.dumps(_message("EventProcessingRequest_ios.json"))
    with caplog.at_level(logging.ERROR):
        response = app.test_client().post("/firehose", data=body, headers=AUTH)
    assert response.status_code == 500
    assert response.get_json() == {"error": {"code": "internal_error", "message": "Internal error; retry later."}}
    assert any(getattr(r, "event", None) == "unhandled_error" and r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/firehose", 405), ("POST", "/firehose/", 404)])
def test_what_is_not_a_firehose_post_goes_on_to_flask(app: Flask, method: str, path: str, status: int) -> None:
    fast = _call(app.wsgi_app, b"{}", path, method, **AUTH)
    assert fast[:3] == _call(app.wsgi_app.flask_wsgi, b"{}", path, method, **AUTH)[:3]
    assert fast[0].startswith(str(status))


ODD_PATHS = [
    "/firehose/x",
    "/firehose/a/b",
    "/firehose/x/",
    "/firehose//x",
    "/firehose/a//b",
    "/firehose/a\nb",
    "/firehose/a\rb",
    "/firehose/%2F",
    "/firehose/ ",
    "/firehose/\u00e9",
    "/firehosex",
    "/firehose/a\x00b",
]


@pytest.mark.parametrize("path", ODD_PATHS)
def test_every_path_is_routed_as_flask_routes_it(app: Flask, path: str) -> None:
    body = b'{"type": "x"}'
    assert _call(app.wsgi_app, body, path, **AUTH)[:3] == _call(app.wsgi_app.flask_wsgi, body, path, **AUTH)[:3]
