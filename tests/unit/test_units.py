"""Unit tests of the plain functions behind the endpoint and the delivery."""

from __future__ import annotations

import hashlib
import ssl
import time
from email.utils import formatdate

import orjson
import pytest

from common.config import Settings
from common.keys import Keys
from common.redaction import REDACTED, redact_message
from common.redis_conn import tls_options
from service.auth import token_is_valid
from tests.support import sample
from workers.delivery import backoff_seconds, classify
from workers.mapping import PermanentFailure, plan_message
from workers.partner.base import Operation, OperationKind
from workers.partner.reference import parse_retry_after
from workers.runtime import Runtime


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Token a", True),
        ("token b", True),
        ("Token  a ", True),
        ("Token c", False),
        ("Bearer a", False),
        ("Token", False),
        ("", False),
        (None, False),
        ("Token a,b", False),
    ],
)
def test_token_check(header: str | None, ok: bool) -> None:
    assert token_is_valid(header, ("a", "b")) is ok


def test_no_configured_token_matches_nothing() -> None:
    assert token_is_valid(None, ()) is False and token_is_valid("Token x", ()) is False


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREHOSE_AUTH_TOKEN", " one, two ,,")
    monkeypatch.setenv("MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/3")
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    settings = Settings.from_env()
    assert settings.auth_tokens == ("one", "two")
    assert settings.max_body_bytes == 1000
    assert settings.broker_url == "redis://example:6379/3"
    assert "one" not in repr(settings) and settings.public()["auth_tokens"] == 2


def test_tls_options_from_url() -> None:
    assert tls_options("redis://h:6379") == {}
    assert tls_options("rediss://h:6379") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert tls_options("rediss://h:6379?ssl_cert_reqs=none") == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert tls_options("rediss://h:6379?ssl_cert_reqs=CERT_NONE") == {"ssl_cert_reqs": ssl.CERT_NONE}


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (202, "ok"),
        (204, "ok"),
        (408, "transient"),
        (429, "transient"),
        (500, "transient"),
        (503, "transient"),
        (504, "transient"),
        (None, "transient"),
        (301, "permanent"),
        (400, "permanent"),
        (401, "permanent"),
        (404, "permanent"),
        (422, "permanent"),
    ],
)
def test_classify(status: int | None, outcome: str) -> None:
    assert classify(status) == outcome


def test_retry_after_forms() -> None:
    now = time.time()
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    date = formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0


class _Rt:
    def __init__(self, **changes: object) -> None:
        self.settings = Settings(**changes)


def test_backoff_is_bounded_and_honours_retry_after() -> None:
    rt: Runtime = _Rt(retry_backoff_base=1.0, retry_backoff_max=30.0, broker_visibility_timeout=3600)  # type: ignore[assignment]
    for attempt in range(1, 12):
        for _ in range(50):
            delay = backoff_seconds(attempt, rt.settings)
            assert 0 <= delay <= min(30.0, 2 ** (attempt - 1))
    assert backoff_seconds(1, rt.settings, retry_after=7) >= 7
    # A hostile Retry-After is capped by RETRY_AFTER_MAX_SECONDS.
    assert backoff_seconds(1, rt.settings, retry_after=10**9) == rt.settings.retry_after_max_seconds


def test_redaction_hides_every_setting_value() -> None:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    redacted = redact_message(message)
    assert set(redacted["account"]["account_settings"].values()) == {REDACTED}
    assert "fixture-api-key-3.2.0" not in orjson.dumps(redacted).decode()
    assert redacted["events"] == message["events"]
    nested = redact_message({"user_profiles": [{"audiences": [{"audience_subscription_settings": {"k": "v"}}]}]})
    assert nested["user_profiles"][0]["audiences"][0]["audience_subscription_settings"] == {"k": REDACTED}


def test_idempotency_key_is_stable_and_specific() -> None:
    op = Operation(OperationKind.EVENTS, {"b": 1, "a": [1, 2]}, "key", message_id="m1")
    same = Operation(OperationKind.EVENTS, {"a": [1, 2], "b": 1}, "other-key", message_id="m1")
    other_message = Operation(OperationKind.EVENTS, {"a": [1, 2], "b": 1}, "key", message_id="m2")
    assert op.idempotency_key() == same.idempotency_key()
    assert op.idempotency_key() != other_message.idempotency_key()
    assert "key" not in repr(op)


def test_event_plan_keeps_ids_and_leaves_settings_out() -> None:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    plan = plan_message(message)
    [op] = plan.operations
    assert op.kind == OperationKind.EVENTS and op.api_key == "fixture-api-key-3.2.0"
    [batch] = op.payload["batches"]
    assert [e["id"] for e in batch["events"]] == [e["id"] for e in message["events"]]
    assert batch["user"]["mpid"] == message["mpid"]
    assert batch["device"]["type"] == "ios" and "identities" not in batch["device"]
    assert batch["user"]["device_identities"] == message["runtime_environment"]["identities"]
    assert "fixture-api-key-3.2.0" not in orjson.dumps(op.payload).decode()


def test_event_plan_skips_bad_events_and_counts_them() -> None:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["events"].append({"type": "hologram", "id": "3f1b3c3e-0000-4000-8000-000000000000", "timestamp_ms": 1})
    message["events"].append({"type": "custom_event", "id": "3f1b3c3e-0000-4000-8000-000000000001"})
    plan = plan_message(message)
    assert len(plan.operations[0].payload["batches"][0]["events"]) == 2
    assert plan.skipped == {"unknown_type": 1, "invalid:timestamp_ms": 1}


def test_batch_of_only_bad_events_plans_nothing() -> None:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["events"] = [{"type": "hologram", "id": "3f1b3c3e-0000-4000-8000-000000000000", "timestamp_ms": 1}]
    message["system_notifications"] = []  # consent notifications alone are work (test_event_fidelity.py)
    assert plan_message(message).operations == []


def test_missing_api_key_is_permanent() -> None:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    del message["account"]["account_settings"]["apiKey"]
    with pytest.raises(PermanentFailure) as info:
        plan_message(message)
    assert info.value.reason == "missing_api_key"


def test_subscription_plans() -> None:
    message = orjson.loads(sample("3.2.0", "AudienceSubscriptionRequest.json"))
    [op] = plan_message(message).operations
    assert (op.kind, op.audience_id) == (OperationKind.AUDIENCE_UPSERT, 1234)
    assert op.payload["name"] == "Fixture Low Engagement"
    message["action"] = "remove"
    [op] = plan_message(message).operations
    assert (op.kind, op.audience_id) == (OperationKind.AUDIENCE_DELETE, 1234)


def test_membership_plan_groups_changes_by_audience() -> None:
    message = orjson.loads(sample("3.2.0", "AudienceMembershipChangeRequest.json"))
    message["account"]["account_settings"]["apiKey"] = "k"
    ops = plan_message(message).operations
    assert [(op.kind, op.audience_id) for op in ops] == [(OperationKind.MEMBERS, a) for a in (456, 654, 789)]
    actions = {op.audience_id: [c["action"] for c in op.payload["changes"]] for op in ops}
    assert actions == {456: ["add"], 654: ["delete"], 789: ["update_attributes"]}
    assert ops[0].payload["changes"][0]["user"]["mpid"] == "2368185964418093797"
    assert ops[0].payload["changes"][0]["timestamp_ms"] == message["timestamp_ms"]


def test_old_membership_format_plans_adds_and_deletes() -> None:
    message = orjson.loads(sample("1.x-unversioned", "AudienceMembershipChangeRequest.json"))
    message["account"]["account_settings"]["apiKey"] = "k"
    ops = plan_message(message).operations
    actions = sorted(c["action"] for op in ops for c in op.payload["changes"])
    assert "add" in actions and "delete" in actions


def test_keys_are_prefixed() -> None:
    keys = Keys("p")
    assert keys.inbox == "p:inbox" and keys.seen_marks == "p:s:" and keys.delivered("k") == "p:delivered:k"


def _entry(n: int, body: dict | str, kind: str = "event_processing_request", **fields: bytes) -> tuple:
    raw = body if isinstance(body, str) else orjson.dumps(body).decode()
    extra = {name.encode(): value for name, value in fields.items()}
    return (f"{1000 + n}-0".encode(), {b"body": raw.encode(), b"type": kind.encode(), b"id": f"m{n}".encode()} | extra)


def _batch(api_key: str | None, events: int) -> dict:
    settings = {"apiKey": api_key} if api_key else {}
    return {
        "type": "event_processing_request",
        "account": {"account_id": 1, "account_settings": settings},
        "events": [{}] * events,
    }


def test_jobs_group_event_batches_by_api_key_within_limits() -> None:
    from workers.grouping import plan_jobs

    entries = [_entry(i, _batch("a" if i % 2 else "b", 3)) for i in range(10)]
    entries.append(_entry(10, {"type": "audience_subscription_request"}, kind="audience_subscription_request"))
    entries.append(_entry(11, _batch(None, 1)))  # no apiKey: alone, to be dead-lettered with its reason
    jobs = plan_jobs(entries, max_messages=3, max_events=100)
    groups = [j for j in jobs if j.task == "events"]
    singles = [j for j in jobs if j.task == "single"]
    assert sorted(len(j.bodies) for j in groups) == [2, 2, 3, 3]
    assert [j.task_id for j in singles] == ["m10", "m11"]
    for job in groups:
        keys = {orjson.loads(b)["account"]["account_settings"]["apiKey"] for b in job.bodies}
        assert len(keys) == 1
        assert job.first_seen_ms == min(int(e.split(b"-")[0]) for e in job.entry_ids)
    assert sorted(e for j in jobs for e in j.entry_ids) == sorted(e for e, _ in entries)


def test_jobs_respect_the_event_limit_and_keep_retried_groups_whole() -> None:
    from workers.grouping import GROUP, plan_jobs

    entries = [_entry(i, _batch("a", 40)) for i in range(5)]
    members = orjson.dumps(["x", "y"]).decode()
    entries.append(_entry(9, members, kind=GROUP, attempt=b"3", first_seen=b"42"))
    jobs = plan_jobs(entries, max_messages=50, max_events=100)
    assert [len(j.bodies) for j in jobs if j.task == "events" and j.attempt == 1] == [2, 2, 1]
    [retried] = [j for j in jobs if j.attempt == 3]
    assert (retried.bodies, retried.first_seen_ms) == (["x", "y"], 42)
    assert plan_jobs(entries[:2], max_messages=1, max_events=100)[0].task == "single"


def _dsr(**changes: object) -> dict:
    message = orjson.loads(sample("3.2.0", "DsrProcessingRequest.json"))
    message["account"] = {"account_id": 99, "account_settings": {"apiKey": "dsr-key"}}
    message.update(changes)
    return message


def test_an_erasure_request_plans_one_erase_call() -> None:
    message = _dsr()
    plan = plan_message(message)
    [op] = plan.operations
    assert (op.kind, op.api_key, op.audience_id, op.message_id) == (OperationKind.ERASE, "dsr-key", None, message["id"])
    assert (plan.message_type, plan.account_id, plan.skipped) == ("dsr_processing_request", 99, {})
    assert op.payload["request_id"] == message["subject_request_id"] and op.payload["regulation"] == "gdpr"
    # Named and encoded as the user's events carry them (docs/partner-api.md, "Erasure").
    assert {(i["type"], i["value"]) for i in op.payload["identities"]} == {
        ("google_advertising_id", message["subject_identities"]["android_advertising_id"]["value"]),
        ("email", hashlib.sha256(message["subject_identities"]["email"]["value"].strip().lower().encode()).hexdigest()),
    }
    assert "dsr-key" not in orjson.dumps(op.payload).decode()


def test_an_erasure_without_an_api_key_is_permanent() -> None:
    with pytest.raises(PermanentFailure) as info:
        plan_message(_dsr(account=None))
    assert info.value.reason == "missing_api_key"


def test_a_dsr_other_than_erasure_is_skipped_without_needing_a_key() -> None:
    plan = plan_message(_dsr(subject_request_type="access", account=None))
    assert plan.operations == [] and plan.skipped == {"unsupported_dsr_type:access": 1}


def test_a_membership_change_without_audiences_needs_no_key_and_plans_nothing() -> None:
    message = orjson.loads(sample("3.2.0", "AudienceMembershipChangeRequest.json"))
    for profile in message["user_profiles"]:
        profile["audiences"] = []
    message["account"]["account_settings"] = {}
    assert plan_message(message).operations == []


@pytest.mark.parametrize("message", [{"type": "something_new"}, {"type": 5}, ["not", "a", "message"]])
def test_an_unsupported_type_is_permanent(message: object) -> None:
    with pytest.raises(PermanentFailure) as info:
        plan_message(message)  # type: ignore[arg-type]
    assert info.value.reason == "unsupported_type"
