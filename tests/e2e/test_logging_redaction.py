"""No secret reaches a log line of any process, and log lines are JSON with the fields operators
search by.

This test sends known secrets (the configured token, a wrong token, the customers' apiKeys and an
audience setting) through every path, with real gunicorn, Celery and partner-stub processes
logging at DEBUG, and then searches everything they printed. (The redaction filter's own tests:
tests/unit/test_logging_redaction.py.)
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_lib
import requests

from common import dead_letters
from common.keys import Keys
from devtools.procs import start_web, start_worker
from tests.support import Stub, base_env, sample, wait_for

TOKEN = f"tok-{uuid.uuid4().hex}"
WRONG_TOKEN = f"wrong-{uuid.uuid4().hex}"
API_KEY = f"key-{uuid.uuid4().hex}"
DEAD_KEY = f"deadkey-{uuid.uuid4().hex}"
AUDIENCE_SECRET = f"aud-{uuid.uuid4().hex}"
QUERY_SECRET = f"q-{uuid.uuid4().hex}"
SECRETS = {
    "token": TOKEN,
    "wrong token": WRONG_TOKEN,
    "apiKey": API_KEY,
    "dead letter apiKey": DEAD_KEY,
    "audience setting": AUDIENCE_SECRET,
    "query token": QUERY_SECRET,
}
REQUEST_ID = f"req-{uuid.uuid4().hex[:12]}"
REQUIRED_FIELDS = {"timestamp", "level", "logger", "message", "event", "service"}
# Celery's signal handlers print this with os.write, on purpose: logging from a signal
# handler can deadlock on a lock the interrupted code holds. It is the one printed line.
CELERY_SIGNAL_NOTICE = re.compile(r"worker: (Warm|Cold) shutdown \(MainProcess\)")


def _message(name: str, api_key: str, **changes: Any) -> dict[str, Any]:
    message = orjson.loads(sample("3.2.0", name))
    message["id"] = str(uuid.uuid4())
    message["account"]["account_settings"]["apiKey"] = api_key
    message.update(changes)
    return message


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _json_lines(name: str, text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or CELERY_SIGNAL_NOTICE.fullmatch(line.strip()):
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            pytest.fail(f"{name} line {number} is not JSON: {line[:300]}")
        assert isinstance(record, dict), line
        assert set(record) >= REQUIRED_FIELDS, f"{name} line {number} lacks {REQUIRED_FIELDS - set(record)}"
        records.append(record)
    return records


@pytest.fixture
def relay(redis_url: str, stub: Stub, logs_dir: Path) -> Iterator[dict[str, Any]]:
    key_prefix = f"redact{uuid.uuid4().hex[:8]}"
    env = base_env(
        redis_url,
        FIREHOSE_AUTH_TOKEN=f"{TOKEN},next-token-rotation",
        PARTNER_API_URL=stub.url,
        REDIS_KEY_PREFIX=key_prefix,
        # Everything the libraries have to say, where a leak is likeliest.
        LOG_LEVEL="DEBUG",
        LOG_FORMAT="json",
    )
    stub.reset()
    stub.faults([{"path_prefix": "/v1/events", "status": 400, "api_key_sha256": _sha(DEAD_KEY)}])
    worker = start_worker("worker-redaction", env, logs_dir)
    web, url = start_web(env, logs_dir, name="web-redaction")
    try:
        yield {"url": url, "keys": Keys(key_prefix), "web": web, "worker": worker}
    finally:
        web.stop()
        worker.stop()
        stub.faults([])


def test_no_secret_in_any_log_of_any_process(
    relay: dict[str, Any], stub: Stub, redis_client: redis_lib.Redis, logs_dir: Path
) -> None:
    url, keys = relay["url"], relay["keys"]
    auth = {"Authorization": f"Token {TOKEN}", "X-Request-Id": REQUEST_ID}

    def post(body: dict[str, Any] | bytes, headers: dict[str, str], query: str = "") -> requests.Response:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        return requests.post(f"{url}/firehose{query}", data=data, headers=headers, timeout=10)

    # Accepted and delivered by the worker, with the apiKey as the partner's bearer token.
    delivered = _message("EventProcessingRequest_ios.json", API_KEY)
    response = post(delivered, auth, f"?token={QUERY_SECRET}")
    assert response.status_code == 202
    assert response.headers["X-Request-Id"] == REQUEST_ID
    # An audience whose subscription settings are a secret too.
    audience = _message("AudienceSubscriptionRequest.json", API_KEY)
    audience["audience_subscription_settings"] = {"listToken": AUDIENCE_SECRET}
    assert post(audience, auth).status_code == 200
    # The wrong token: 401.
    assert (
        post(
            _message("EventProcessingRequest_ios.json", API_KEY), {"Authorization": f"Token {WRONG_TOKEN}"}
        ).status_code
        == 401
    )
    # A 400 that still carries the settings.
    invalid = _message("EventProcessingRequest_ios.json", API_KEY, id="not-a-uuid")
    assert post(invalid, auth).status_code == 400
    assert post(b'{"account_settings": {"apiKey": "' + API_KEY.encode() + b'"', auth).status_code == 400
    # Registration, with a token it does not need.
    registration = post(sample("3.2.0", "ModuleRegistrationRequest.json"), auth)
    assert registration.status_code == 200
    # Rejected by the partner with a 400: a dead letter.
    dead = _message("EventProcessingRequest_android.json", DEAD_KEY)
    assert post(dead, auth).status_code == 202

    def partner_saw(path: str, key: str) -> bool:
        return any(r["api_key_sha256"] == _sha(key) for r in stub.requests(path))

    wait_for(lambda: partner_saw("/v1/events", API_KEY), 30, what="the batch at the partner")
    wait_for(lambda: partner_saw("/v1/audiences", API_KEY), 30, what="the audience at the partner")
    letter = wait_for(lambda: dead_letters.get(redis_client, keys, dead["id"]), 30, what="the dead letter")
    assert letter.last_status == 400
    wait_for(lambda: delivered["id"] in relay["worker"].output(), 30, what="the worker to log the delivery")

    # Stop both so every line is flushed; the stub keeps running (it is shared).
    relay["web"].stop()
    relay["worker"].stop()
    logs = {
        "web": relay["web"].output(),
        "worker": relay["worker"].output(),
        "partner stub": (logs_dir / "partner-stub.log").read_text(errors="replace"),
    }
    for name, text in logs.items():
        assert text.strip(), f"no output captured from {name}"
        for what, secret in SECRETS.items():
            assert secret not in text, f"the {what} is in the {name} log"

    web = _json_lines("web", logs["web"])
    worker = _json_lines("worker", logs["worker"])
    assert {r["service"] for r in web} == {"web"} and {r["service"] for r in worker} == {"worker"}

    summaries = [r for r in web if r["event"] == "firehose_request"]
    # One line per Firehose request: gunicorn's access line carries the app's fields.
    [first] = [r for r in summaries if r.get("message_id") == delivered["id"]]
    assert first["request_id"] == REQUEST_ID
    assert first["method"] == "POST" and first["path"] == "/firehose" and first["duration_ms"] >= 0
    assert first["account_id"] == delivered["account"]["account_id"]
    assert first["message_type"] == "event_processing_request" and first["status"] == 202
    assert any(r["status"] == 401 and r["error"] == "unauthorized" for r in summaries)
    assert any(r["status"] == 400 and r["error"] == "invalid_envelope" for r in summaries)
    assert all(r.get("request_id") for r in summaries)

    access = [r for r in web if r["event"] == "http_access"]
    assert access and all(r["path"] != "/firehose" for r in access)
    assert all("?" not in r["path"] for r in access + summaries)

    attempts = [r for r in worker if r["event"] == "delivery_attempt"]
    assert any(r["message_id"] == delivered["id"] and r["account_id"] for r in attempts)
    assert any(r["message_id"] == dead["id"] for r in attempts)
