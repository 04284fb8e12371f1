"""The Lambda handler over every sample (the fixtures, and the shared corpus when present),
against the real Redis.

The handler module builds its app at import from the environment, as it does in a Lambda
container, so each test sets the environment and (re)imports the module.
"""

from __future__ import annotations

import importlib
import json
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import orjson
import pytest
import redis as redis_lib

from common.keys import Keys
from schemas.envelope import MISSING_API_KEY
from schemas.messages import EVENTS, MEMBERSHIP, REGISTRATION, RESPONSES
from tests.support import SAMPLES, every_sample, sample_id

INBOX = Keys("fr").inbox
CONTEXT = SimpleNamespace(aws_request_id="test-request", function_name="firehose-relay")


def load_handler_module(monkeypatch: pytest.MonkeyPatch, redis_url: str, **env: str) -> ModuleType:
    for name in ("CELERY_BROKER_URL", "FIREHOSE_AUTH_TOKEN", "REDIS_KEY_PREFIX", "MAX_BODY_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    # Loopback on a shared 2-core CI machine: a generous budget so a scheduling hiccup is not a 503.
    monkeypatch.setenv("INGEST_REDIS_TIMEOUT_MS", "1000")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    module = sys.modules.get("service.lambda_handler")
    return importlib.reload(module) if module else importlib.import_module("service.lambda_handler")


@pytest.fixture
def lam(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> ModuleType:
    return load_handler_module(monkeypatch, redis_url)


@pytest.fixture
def inbox(redis_client: redis_lib.Redis) -> Iterator[dict[str, bytes]]:
    """Inbox entries added during the test, by message id; removed afterwards.

    No worker runs in this module, so what lands here would otherwise wait for the next
    test that starts one.
    """
    last = redis_client.xrevrange(INBOX, count=1)
    start = last[0][0] if last else b"0-0"

    class Added(dict):
        def refresh(self) -> Added:
            self.clear()
            for _, fields in redis_client.xrange(INBOX, min=b"(" + start):
                self[fields[b"id"].decode()] = fields[b"body"]
            return self

    added = Added()
    yield added
    entries = [entry_id for entry_id, _ in redis_client.xrange(INBOX, min=b"(" + start)]
    if entries:
        redis_client.xdel(INBOX, *entries)


def sample_files() -> list[Path]:
    files = every_sample()
    fixtures = [path for path in files if path.is_relative_to(SAMPLES)]
    assert len(fixtures) >= 180, f"expected the fixtures at {SAMPLES} (python -m devtools.make_fixtures)"
    return files


def has_work(message: dict[str, Any]) -> bool:
    """What the relay must store: everything but registration and verification traffic."""
    kind = message.get("type")
    if kind == REGISTRATION:
        return False
    if kind == EVENTS:
        # Consent notifications without events are work too (3.2.0 eventless batches).
        return bool(message.get("events")) or bool(message.get("system_notifications"))
    if kind == MEMBERSHIP:
        return bool(message.get("user_profiles"))
    return True


def lacks_api_key(message: dict[str, Any]) -> bool:
    """Work with no apiKey to deliver it with (the SDK's membership and DSR samples, the old event
    samples): refused at the door, naming the field, rather than accepted and dead-lettered."""
    settings = (message.get("account") or {}).get("account_settings") or {}
    return has_work(message) and not settings.get("apiKey")


def check_answer(message: Any, answer: Any, where: str) -> None:
    # Lambda serialises the return value with the standard json module: it must be plain JSON.
    json.dumps(answer)
    assert isinstance(answer, dict), where
    kind = message.get("type") if isinstance(message, dict) else None
    if kind in RESPONSES and lacks_api_key(message):
        assert answer["error"]["code"] == "invalid_envelope", f"{where}: {answer}"
        assert answer["error"]["fields"] == {"account": {"account_settings": {"apiKey": [MISSING_API_KEY]}}}, where
    elif kind in RESPONSES:
        expected_type, _ = RESPONSES[kind]
        assert answer.get("type") == expected_type, f"{where}: {answer}"
        assert {"id", "timestamp_ms", "firehose_version"} <= set(answer), where
    else:
        assert set(answer) == {"error"}, f"{where}: {answer}"
        assert answer["error"]["code"] == "unsupported_type", f"{where}: {answer}"


def test_every_sample_as_dict_str_and_bytes(lam: ModuleType, inbox: dict[str, bytes]) -> None:
    """Each sample three ways (the runtime's parsed dict, a JSON string, raw bytes), each with
    a fresh id so the dedupe mark of an earlier call cannot hide whether this one stored."""
    stored_expected: dict[str, Any] = {}
    not_stored: list[str] = []
    refused: list[str] = []
    invalid = 0
    for path in sample_files():
        raw = path.read_bytes()
        try:
            message = json.loads(raw)
        except ValueError:
            invalid += 1
            for event in (raw, raw.decode("utf-8", "replace")):
                answer = lam.handler(event, CONTEXT)
                assert answer["error"]["code"] == "invalid_json", path
            continue
        for form in ("dict", "str", "bytes"):
            if isinstance(message, dict):
                message = dict(message, id=str(uuid.uuid4()))
            body = json.dumps(message).encode()
            event = {"dict": message, "str": body.decode(), "bytes": body}[form]
            answer = lam.handler(event, CONTEXT)
            where = f"{sample_id(path)} as {form}"
            check_answer(message, answer, where)
            if isinstance(message, dict) and message.get("type") in RESPONSES:
                if lacks_api_key(message):
                    refused.append(message["id"])
                elif has_work(message):
                    stored_expected[message["id"]] = (form, body, message)
                else:
                    not_stored.append(message["id"])
    assert invalid >= 1, "the samples include one that is not JSON; the handler must answer it 400"
    assert not_stored, "the samples include registration and verification traffic"

    inbox.refresh()
    missing = sorted(set(stored_expected) - set(inbox))
    assert not missing, f"accepted but not in {INBOX}: {missing[:5]}"
    assert not set(not_stored) & set(inbox), "registration or verification traffic was queued"
    assert refused, "the samples include messages with work and no apiKey"
    assert not set(refused) & set(inbox), "a message without an apiKey was queued"
    for message_id, (form, body, message) in stored_expected.items():
        # A string or bytes event is stored byte for byte; a dict as its JSON, with the same content.
        if form == "dict":
            assert orjson.loads(inbox[message_id]) == message
        else:
            assert inbox[message_id] == body


def test_verification_traffic_is_answered_and_not_queued(lam: ModuleType, inbox: dict[str, bytes]) -> None:
    base = json.loads((SAMPLES / "3.2.0" / "EventProcessingRequest_ios.json").read_bytes())
    base["system_notifications"] = []  # with notifications, a batch without events is work
    membership = json.loads((SAMPLES / "3.2.0" / "AudienceMembershipChangeRequest.json").read_bytes())
    cases = [
        dict(base, id=str(uuid.uuid4()), events=[]),
        {k: v for k, v in dict(base, id=str(uuid.uuid4())).items() if k != "events"},
        {k: v for k, v in dict(membership, id=str(uuid.uuid4())).items() if k != "user_profiles"},
    ]
    for message in cases:
        answer = lam.handler(message, CONTEXT)
        assert answer["type"] == RESPONSES[message["type"]][0]
    assert not {m["id"] for m in cases} & set(inbox.refresh())


def test_a_repeated_message_is_answered_again_and_stored_once(lam: ModuleType, inbox: dict[str, bytes]) -> None:
    message = json.loads((SAMPLES / "3.2.0" / "EventProcessingRequest_android.json").read_bytes())
    message["id"] = str(uuid.uuid4())
    first = lam.handler(message, CONTEXT)
    second = lam.handler(json.dumps(message), CONTEXT)
    assert first["type"] == second["type"] == "event_processing_response"
    assert list(inbox.refresh()).count(message["id"]) == 1


def test_large_integers_are_stored_exactly(lam: ModuleType, inbox: dict[str, bytes]) -> None:
    """A dict event is re-serialised; its 64-bit (and larger) integers must survive that."""
    message = json.loads((SAMPLES / "3.2.0" / "EventProcessingRequest_ios.json").read_bytes())
    message["id"] = str(uuid.uuid4())
    message["events"][0]["session_id"] = -(2**63)
    message["events"][0]["custom"] = 2**64 - 1
    lam.handler(message, CONTEXT)
    stored = inbox.refresh()[message["id"]]
    assert b"-9223372036854775808" in stored
    assert b"18446744073709551615" in stored


@pytest.mark.parametrize(
    ("event", "code"),
    [
        ({"type": "event_processing_request", "id": "not-a-uuid", "timestamp_ms": 1}, "invalid_envelope"),
        ({"type": "bogus_request"}, "unknown_type"),
        ([1, 2, 3], "invalid_envelope"),
        (b"\xff\xfe not json", "invalid_json"),
        ("{", "invalid_json"),
        # NaN is not JSON and the HTTP path refuses it; Python's json module would let it through.
        ({"type": "event_processing_request", "nan": float("nan")}, "invalid_json"),
    ],
)
def test_permanent_rejections_return_the_error_body(lam: ModuleType, event: Any, code: str) -> None:
    answer = lam.handler(event, CONTEXT)
    json.dumps(answer)
    assert set(answer) == {"error"}
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]


def test_no_token_is_needed(monkeypatch: pytest.MonkeyPatch, redis_url: str, inbox: dict[str, bytes]) -> None:
    """IAM guards the function: a configured inbound token does not apply to invocations."""
    lam = load_handler_module(monkeypatch, redis_url, FIREHOSE_AUTH_TOKEN="some-token")
    message = json.loads((SAMPLES / "3.2.0" / "EventProcessingRequest_ios.json").read_bytes())
    message["id"] = str(uuid.uuid4())
    assert lam.handler(message, CONTEXT)["type"] == "event_processing_response"
    assert message["id"] in inbox.refresh()


def test_oversize_body_is_a_permanent_rejection(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    lam = load_handler_module(monkeypatch, redis_url, MAX_BODY_BYTES="1000")
    message = json.loads((SAMPLES / "3.2.0" / "EventProcessingRequest_ios.json").read_bytes())
    message["padding"] = "x" * 2000
    assert lam.handler(message, CONTEXT)["error"]["code"] == "payload_too_large"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_redis_raises_so_mparticle_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    lam = load_handler_module(monkeypatch, f"redis://127.0.0.1:{closed_port()}/0")
    message = json.loads((SAMPLES / "3.2.0" / "EventProcessingRequest_ios.json").read_bytes())
    message["id"] = str(uuid.uuid4())
    with pytest.raises(lam.RetryLater) as raised:
        lam.handler(message, CONTEXT)
    assert raised.value.status == 503
    assert raised.value.code == "unavailable"
    # The failure message must not carry the customer's settings (Lambda logs it).
    api_key = message["account"]["account_settings"]["apiKey"]
    assert "apiKey" not in str(raised.value) and api_key not in str(raised.value)

    # What needs no Redis is still answered: registration and verification traffic.
    registration = json.loads((SAMPLES / "3.2.0" / "ModuleRegistrationRequest.json").read_bytes())
    assert lam.handler(registration, CONTEXT)["type"] == "module_registration_response"
    verification = dict(message, events=[], system_notifications=[])
    assert lam.handler(verification, CONTEXT)["type"] == "event_processing_response"
