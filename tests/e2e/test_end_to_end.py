"""The whole path with real parts: gunicorn, Redis, a Celery worker and the partner stub.

No mocks: every message goes over loopback HTTP into the web, through Redis and Celery,
and out over HTTP to the stub, whose own records are what the tests check.
"""

from __future__ import annotations

import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import redis as redis_lib
import requests
from marshmallow import ValidationError

from common import dead_letters
from common.keys import BACKLOG_LUA, Keys
from common.names import DELIVERY_QUEUE
from schemas.envelope import MISSING_API_KEY, carries_work
from schemas.messages import RESPONSES
from tests.support import SAMPLES, Proc, Stub, every_sample, sample, sample_id, wait_for

AUTH = {"Authorization": "Token test-token"}


def post(web: str, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{web}/firehose", data=body, headers=headers or AUTH, timeout=10)


def fresh(version: str, name: str) -> dict:
    """A sample with a new message id, so earlier tests' dedupe keys do not swallow it."""
    message = orjson.loads(sample(version, name))
    message["id"] = str(uuid.uuid4())
    return message


def all_samples() -> list[Path]:
    """Every fixture, and every shared SDK sample too when this machine has the corpus."""
    return every_sample()


def _work_without_api_key(message: dict) -> bool:
    settings = (message.get("account") or {}).get("account_settings") or {}
    if settings.get("apiKey") or message.get("type") == "module_registration_request":
        return False
    try:
        return carries_work(message.get("type"), message)
    except ValidationError:
        return False


def test_every_sample_gets_the_right_answer(web: str) -> None:
    files = all_samples()
    fixtures = [path for path in files if path.is_relative_to(SAMPLES)]
    assert len(fixtures) >= 180, f"expected the fixtures at {SAMPLES} (python -m devtools.make_fixtures)"
    for path in files:
        where = sample_id(path)
        body = path.read_bytes()
        response = post(web, body)
        assert response.headers["Content-Type"].startswith("application/json"), where
        try:
            kind = orjson.loads(body).get("type")
        except orjson.JSONDecodeError:
            assert response.status_code == 400, where
            assert response.json()["error"]["code"] == "invalid_json"
            continue
        if kind in RESPONSES and _work_without_api_key(orjson.loads(body)):
            # Nothing could deliver it: refused at the door, naming the field (schemas/envelope.py).
            assert response.status_code == 400, f"{where}: {response.text}"
            named = {"account": {"account_settings": {"apiKey": [MISSING_API_KEY]}}}
            assert response.json()["error"]["fields"] == named, where
        elif kind in RESPONSES:
            expected_type, expected_status = RESPONSES[kind]
            assert response.status_code == expected_status, f"{where}: {response.text}"
            answer = response.json()
            assert answer["type"] == expected_type
            assert {"id", "timestamp_ms", "firehose_version"} <= set(answer)
        else:
            assert response.status_code == 400, where
            assert response.json()["error"]["code"] == "unsupported_type"


@pytest.fixture
def partner(worker: Proc, stub: Stub, redis_client: redis_lib.Redis) -> Stub:
    """The stub, reset once the worker has finished with what earlier tests queued."""
    wait_for(lambda: queues_drained(redis_client), 60, what="earlier work to drain")
    stub.reset()
    return stub


def queues_drained(client: redis_lib.Redis) -> bool:
    """Nothing anywhere work waits or runs: the inbox and the pump's lanes, the retry schedule,
    Celery's queue, a worker's unacknowledged tasks, published tasks not yet ended."""
    keys = Keys("fr")
    backlog, _ = client.eval(BACKLOG_LUA, 2, keys.inbox, keys.lanes, keys.lane_prefix)
    return (
        int(backlog) == 0
        and client.zcard(keys.retry_schedule) == 0
        and client.llen(DELIVERY_QUEUE) == 0
        and client.hlen("unacked") == 0
        and client.zcard(keys.published) == 0
    )


def event_ids(message: dict) -> list[str]:
    return [event["id"] for event in message["events"]]


@pytest.mark.parametrize("name", ["EventProcessingRequest_ios.json", "EventProcessingRequest_android.json"])
def test_sample_events_arrive_at_the_partner(web: str, partner: Stub, name: str) -> None:
    message = fresh("3.2.0", name)
    assert post(web, orjson.dumps(message)).status_code == 202

    events = wait_for(
        lambda: all(i in partner.state()["events"] for i in event_ids(message)) and partner.state()["events"],
        timeout=30,
        what="the sample's events at the stub",
    )
    assert {i: events[i] for i in event_ids(message)} == {i: 1 for i in event_ids(message)}
    [call] = partner.requests("/v1/events")
    assert call["status"] == 202
    [batch] = call["body"]["batches"]
    assert batch["message_id"] == message["id"]
    assert batch["user"]["mpid"] == message["mpid"]
    assert batch["events"] == message["events"]
    # The customer's apiKey travels as the bearer token, and is not in the payload.
    assert message["account"]["account_settings"]["apiKey"] not in orjson.dumps(call["body"]).decode()


def test_big_integers_and_production_quirks_arrive_intact(web: str, partner: Stub) -> None:
    message = fresh("observed", "EventProcessingRequest_iterable_production_2.2.0.json")
    message["account"]["account_settings"]["apiKey"] = "observed-key"
    message["events"][0]["session_id"] = -(2**63)
    assert post(web, orjson.dumps(message)).status_code == 202
    wait_for(lambda: partner.requests("/v1/events"), 30, what="the batch at the stub")
    [call] = partner.requests("/v1/events")
    [batch] = call["body"]["batches"]
    assert batch["events"][0]["session_id"] == -(2**63)
    assert batch["user"]["mpid"] == message["mpid"]


def test_mparticle_retries_are_delivered_once(web: str, partner: Stub, redis_client: redis_lib.Redis) -> None:
    message = fresh("3.2.0", "EventProcessingRequest_ios.json")
    body = orjson.dumps(message)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(web, body).status_code, range(16)))
    assert statuses == [202] * 16
    wait_for(lambda: partner.requests("/v1/events"), 30, what="the batch at the stub")
    # Count only once nothing is left anywhere that could still turn into a second call.
    wait_for(lambda: queues_drained(redis_client), 30, what="the queues to drain")
    assert len(partner.requests("/v1/events")) == 1
    assert all(partner.state()["events"][i] == 1 for i in event_ids(message))


def test_transient_failures_are_retried_with_the_same_key(web: str, partner: Stub) -> None:
    partner.faults([{"path_prefix": "/v1/events", "status": 503, "times": 2}])
    message = fresh("3.2.0", "EventProcessingRequest_android.json")
    assert post(web, orjson.dumps(message)).status_code == 202
    wait_for(
        lambda: any(r["status"] == 202 for r in partner.requests("/v1/events")),
        30,
        what="delivery after two 503s",
    )
    calls = partner.requests("/v1/events")
    assert [c["status"] for c in calls] == [503, 503, 202]
    assert len({c["idempotency_key"] for c in calls}) == 1
    assert all(partner.state()["events"][i] == 1 for i in event_ids(message))


def test_permanent_rejection_is_dead_lettered_then_replayed(
    web: str, partner: Stub, redis_client: redis_lib.Redis
) -> None:
    keys = Keys("fr")
    partner.faults([{"path_prefix": "/v1/events", "status": 400, "times": 1}])
    message = fresh("3.2.0", "EventProcessingRequest_ios.json")
    assert post(web, orjson.dumps(message)).status_code == 202
    letter = wait_for(lambda: dead_letters.get(redis_client, keys, message["id"]), 30, what="the dead letter")
    assert letter.reason == "partner_rejected"
    assert letter.last_status == 400
    assert letter.attempts == 1
    assert message["account"]["account_settings"]["apiKey"] not in orjson.dumps(letter.summary()).decode()
    assert len(partner.requests("/v1/events")) == 1

    assert dead_letters.replay(redis_client, keys, message["id"])
    wait_for(lambda: all(i in partner.state()["events"] for i in event_ids(message)), 30, what="the replay")
    assert dead_letters.get(redis_client, keys, message["id"]) is None


def test_audience_samples_reach_the_partner(web: str, partner: Stub) -> None:
    subscription = fresh("3.2.0", "AudienceSubscriptionRequest.json")
    assert post(web, orjson.dumps(subscription)).status_code == 200
    wait_for(lambda: partner.requests("/v1/audiences"), 30, what="the audience upsert")
    [call] = partner.requests("/v1/audiences")
    assert (call["method"], call["path"]) == ("PUT", "/v1/audiences/1234")

    membership = fresh("3.2.0", "AudienceMembershipChangeRequest.json")
    membership["account"]["account_settings"]["apiKey"] = "sample API Key"
    assert post(web, orjson.dumps(membership)).status_code == 200
    wait_for(lambda: len(partner.requests("/v1/audiences")) >= 4, 30, what="the member changes")
    paths = sorted(c["path"] for c in partner.requests("/v1/audiences") if c["method"] == "POST")
    assert paths == ["/v1/audiences/456/members", "/v1/audiences/654/members", "/v1/audiences/789/members"]


def consent_key(message: dict) -> str:
    """How the stub keys a user's consent and notifications: API key hash and mpid."""
    return f"{hashlib.sha256(message['account']['account_settings']['apiKey'].encode()).hexdigest()}:{message['mpid']}"


def test_consent_and_every_batch_field_reach_the_partner(web: str, partner: Stub) -> None:
    message = fresh("3.2.0", "EventProcessingRequest_ios.json")
    assert post(web, orjson.dumps(message)).status_code == 202
    wait_for(lambda: partner.requests("/v1/events"), 30, what="the batch at the stub")
    [call] = partner.requests("/v1/events")
    [batch] = call["body"]["batches"]
    for field in (
        "source_id",
        "firehose_version",
        "device_application_stamp",
        "integration_attributes",
        "platform_fields",
        "consent_state",
        "system_notifications",
        "events",
    ):
        assert batch[field] == message[field], field
    # What the partner made of it: the user's consent, and the changes that led there.
    state = partner.state()
    user = consent_key(message)
    assert state["consent"][user]["consent_state"] == message["consent_state"]
    assert [n["notification"] for n in state["notifications"][user]] == message["system_notifications"]


def test_a_notification_only_batch_is_delivered_and_verification_is_not(web: str, partner: Stub) -> None:
    verification = fresh("3.2.0", "EventProcessingRequest_android.json")
    verification.update(events=[], system_notifications=[])
    assert post(web, orjson.dumps(verification)).status_code == 202
    # 3.2.0 `allow_eventless_batches`: the user withdrew consent and did nothing else.
    withdrawal = fresh("3.2.0", "EventProcessingRequest_ios.json")
    del withdrawal["events"]
    withdrawal["consent_state"]["gdpr_consent_state"]["marketing"]["consented"] = False
    assert post(web, orjson.dumps(withdrawal)).status_code == 202

    wait_for(lambda: partner.state()["eventless_batches"], 30, what="the notification-only batch at the stub")
    [call] = partner.requests("/v1/events")
    assert call["status"] == 202
    [batch] = call["body"]["batches"]
    assert batch["message_id"] == withdrawal["id"]
    assert batch["events"] == []
    assert batch["system_notifications"] == withdrawal["system_notifications"]
    state = partner.state()
    assert state["consent"][consent_key(withdrawal)]["consent_state"] == withdrawal["consent_state"]
    assert state["event_batches"] == state["eventless_batches"] == 1


def test_big_messages_arrive_whole_and_once(web: str, partner: Stub) -> None:
    # Past the size where the door leaves the items unparsed (service/message_view.py) and the
    # body goes into Redis by its own XADD (service/ingest.py): each posted twice, as a retry.
    batch = fresh("3.2.0", "EventProcessingRequest_android.json")
    batch["account"]["account_settings"]["apiKey"] = "big-batch-key"
    template = batch["events"][0]
    batch["events"] = [dict(template, id=str(uuid.uuid4())) for _ in range(200)]
    change = fresh("3.2.0", "AudienceMembershipChangeRequest.json")
    change["account"]["account_settings"]["apiKey"] = "big-change-key"
    profile = change["user_profiles"][0]
    change["user_profiles"] = [dict(profile, mpid=str(1000 + i)) for i in range(150)]
    for message, status in ((batch, 202), (change, 200)):
        body = orjson.dumps(message)
        assert len(body) > 32 * 1024
        assert [post(web, body).status_code for _ in range(2)] == [status, status]

    wait_for(lambda: all(i in partner.state()["events"] for i in event_ids(batch)), 60, what="the 200 events")
    assert all(partner.state()["events"][i] == 1 for i in event_ids(batch))
    sent = [e for call in partner.requests("/v1/events") for b in call["body"]["batches"] for e in b["events"]]
    assert sorted(sent, key=lambda e: e["id"]) == sorted(batch["events"], key=lambda e: e["id"])

    def member_changes() -> list[dict]:
        return [
            c for call in partner.requests("/v1/audiences") if call["method"] == "POST" for c in call["body"]["changes"]
        ]

    audiences = len(profile["audiences"])
    wait_for(lambda: len(member_changes()) >= 150 * audiences, 60, what="every profile's audience changes")
    assert sorted(c["user"]["mpid"] for c in member_changes()) == sorted(
        [str(1000 + i) for i in range(150)] * audiences
    )
