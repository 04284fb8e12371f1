"""The door's Redis rules: dedupe per account, the suspension flag only lifted by what proves the
key changed, no start on an evicting Redis, 503 above the memory watermark. Flask's test client
against the suite's real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import orjson
import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient

from common.config import Settings
from common.keys import Keys, mark_digest, partner_key
from common.marks import Marks
from service import create_app
from service.ingest import RedisPolicyError, app_ingest
from tests.support import sample
from workers.gate import lift_suspension

TOKEN = "scope-token"
AUTH = {"Authorization": f"Token {TOKEN}"}
KEYS = Keys("fr")


def make_app(redis_url: str, **overrides: object) -> Flask:
    settings = Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=(TOKEN,))
    return create_app(settings.model_copy(update=overrides))


@pytest.fixture
def client(redis_url: str) -> FlaskClient:
    return make_app(redis_url).test_client()


def event_batch(account_id: int, message_id: str) -> dict:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = message_id
    message["account"] = {"account_id": account_id, "account_settings": {"apiKey": f"key-{account_id}"}}
    return message


def membership(account_id: int, api_key: str | None, profiles: bool = True) -> dict:
    message = orjson.loads(sample("3.2.0", "AudienceMembershipChangeRequest.json"))
    message["id"] = str(uuid.uuid4())
    message["account"] = {"account_id": account_id, "account_settings": {"apiKey": api_key} if api_key else {}}
    if not profiles:
        message.pop("user_profiles", None)
    return message


def inbox(redis_client: redis_lib.Redis) -> list[dict]:
    return [orjson.loads(fields[b"body"]) for _, fields in redis_client.xrange(KEYS.inbox)]


def suspend_answer(client: FlaskClient, message: dict) -> bool:
    response = client.post("/firehose", data=orjson.dumps(message), headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["suspend_subscription"]


def test_one_message_id_from_two_accounts_is_stored_for_each(
    client: FlaskClient, redis_client: redis_lib.Redis
) -> None:
    shared_id = str(uuid.uuid4())
    for account_id in (501, 502, 501):  # the third is account 501's retry: a duplicate
        response = client.post("/firehose", data=orjson.dumps(event_batch(account_id, shared_id)), headers=AUTH)
        assert response.status_code == 202
    stored = [m["account"]["account_id"] for m in inbox(redis_client) if m["id"] == shared_id]
    assert sorted(stored) == [501, 502]
    marks = Marks(redis_client, KEYS, 86400)
    assert marks.seen(shared_id, 501) and marks.seen(shared_id, 502)


def test_marks_are_compact() -> None:
    # A mark is a 12-byte digest, a field of a small hash (common/marks.py; README, "Sizing Redis").
    assert len(mark_digest(2**62, str(uuid.uuid4()))) == 12
    assert KEYS.delivered("f" * 64) == "fr:delivered:" + "f" * 64  # the previous release's key, read


def test_verification_without_a_key_leaves_the_suspension(client: FlaskClient, redis_client: redis_lib.Redis) -> None:
    account = 70001
    flag = KEYS.suspended(account)
    redis_client.set(flag, partner_key("revoked"), ex=600)
    # No apiKey proves nothing about the refused one: still suspended, the flag stays.
    assert suspend_answer(client, membership(account, None, profiles=False)) is True
    assert suspend_answer(client, membership(account, "revoked", profiles=False)) is True
    # A verification message with a new key stores nothing: it answers for its key, lifts nothing.
    assert suspend_answer(client, membership(account, "new-key", profiles=False)) is False
    assert redis_client.get(flag) == partner_key("revoked").encode()
    assert suspend_answer(client, membership(account, "revoked")) is True


def test_only_a_stored_message_with_a_new_key_lifts_the_suspension(
    client: FlaskClient, redis_client: redis_lib.Redis
) -> None:
    account = 70002
    flag = KEYS.suspended(account)
    redis_client.set(flag, partner_key("revoked"), ex=600)
    fixed = membership(account, "fixed-key")
    assert suspend_answer(client, fixed) is False
    assert not redis_client.exists(flag)
    # Refused again, then mParticle retries the earlier message: a duplicate stores nothing, lifts nothing.
    redis_client.set(flag, partner_key("fixed-key"), ex=600)
    retry_with_other_key = dict(fixed, account={"account_id": account, "account_settings": {"apiKey": "other"}})
    assert suspend_answer(client, retry_with_other_key) is False
    assert redis_client.get(flag) == partner_key("fixed-key").encode()


def test_a_partner_success_lifts_only_its_own_key(redis_client: redis_lib.Redis) -> None:
    flag = KEYS.suspended(70003)
    redis_client.set(flag, partner_key("refused"), ex=600)
    assert not lift_suspension(redis_client, flag, partner_key("an-older-key"))
    assert redis_client.exists(flag)
    assert lift_suspension(redis_client, flag, partner_key("refused"))
    assert not redis_client.exists(flag)


@pytest.fixture
def policy(redis_client: redis_lib.Redis) -> Iterator[redis_lib.Redis]:
    """The suite's Redis; its maxmemory settings are put back however the test ends."""
    saved = redis_client.config_get("maxmemory*")
    try:
        yield redis_client
    finally:
        redis_client.config_set("maxmemory-policy", saved["maxmemory-policy"])
        redis_client.config_set("maxmemory", saved["maxmemory"])


@pytest.mark.parametrize("evicting", ["allkeys-lru", "volatile-ttl"])
def test_an_evicting_redis_stops_the_app_at_start(redis_url: str, policy: redis_lib.Redis, evicting: str) -> None:
    policy.config_set("maxmemory-policy", evicting)
    with pytest.raises(RedisPolicyError, match=f"'{evicting}'.*noeviction"):
        make_app(redis_url)
    policy.config_set("maxmemory-policy", "noeviction")
    make_app(redis_url)


def test_above_the_watermark_the_door_answers_503_before_writing(
    redis_url: str, policy: redis_lib.Redis, redis_client: redis_lib.Redis
) -> None:
    used = redis_client.info("memory")["used_memory"]
    # maxmemory twice what is used, watermark 10 %: above it, with room left for the test itself.
    policy.config_set("maxmemory", str(used * 2))
    app = make_app(redis_url, redis_memory_high_watermark=0.1)
    message = event_batch(503, str(uuid.uuid4()))
    response = app.test_client().post("/firehose", data=orjson.dumps(message), headers=AUTH)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.get_json()["error"]["code"] == "unavailable"
    assert not Marks(redis_client, KEYS, 86400).seen(message["id"], 503)
    assert message["id"] not in [m["id"] for m in inbox(redis_client)]
    # Room again: the next reading (at most a second old in service; forced here) lets it in.
    policy.config_set("maxmemory", "0")
    app_ingest(app)._memory_next_check = 0.0
    assert app.test_client().post("/firehose", data=orjson.dumps(message), headers=AUTH).status_code == 202
