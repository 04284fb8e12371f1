"""The door's store of a big body (service/ingest.py, BIG_BODY_BYTES and up): the body's own XADD
and the script in one MULTI/EXEC. It must keep every rule the small store keeps: one inbox entry
per account and message id, the body byte for byte, the suspension flag's rules, the 503 of an
unconfirmed write under REDIS_MIN_REPLICAS, a script cache that Redis lost. Against the suite's
real Redis, through the app."""

from __future__ import annotations

import uuid

import orjson
import pytest
import redis as redis_lib
from flask import Flask

from common.config import Settings
from common.keys import Keys, partner_key
from common.marks import Marks
from service import create_app
from service.ingest import BIG_BODY_BYTES
from tests.support import sample

TOKEN = "big-token"
AUTH = {"Authorization": f"Token {TOKEN}"}
SIZES = {"small": 0, "big": BIG_BODY_BYTES}


@pytest.fixture
def keys() -> Keys:
    """A key prefix of the test's own on the suite's Redis."""
    return Keys(f"t{uuid.uuid4().hex[:8]}")


def make_app(redis_url: str, keys: Keys, **overrides: object) -> Flask:
    settings = Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=(TOKEN,), key_prefix=keys.prefix)
    return create_app(settings.model_copy(update=overrides))


def _sized(message: dict, size: str) -> bytes:
    """The message's body, its list of items long enough for `size`."""
    field = "events" if "events" in message else "user_profiles"
    items = message[field]
    body = orjson.dumps(message)
    while len(body) < SIZES[size]:
        items = items * 2
        body = orjson.dumps(dict(message, **{field: items}))
    return body


def event_batch(account_id: int, message_id: str) -> dict:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = message_id
    message["account"] = {"account_id": account_id, "account_settings": {"apiKey": f"key-{account_id}"}}
    return message


def membership(account_id: int, api_key: str) -> dict:
    message = orjson.loads(sample("3.2.0", "AudienceMembershipChangeRequest.json"))
    message["id"] = str(uuid.uuid4())
    message["account"] = {"account_id": account_id, "account_settings": {"apiKey": api_key}}
    return message


def inbox(redis_client: redis_lib.Redis, keys: Keys) -> list[bytes]:
    return [fields[b"body"] for _, fields in redis_client.xrange(keys.inbox)]


@pytest.mark.parametrize("size", SIZES)
def test_each_account_stores_its_message_once_byte_for_byte(
    redis_url: str, redis_client: redis_lib.Redis, keys: Keys, size: str
) -> None:
    client = make_app(redis_url, keys).test_client()
    shared_id = str(uuid.uuid4())
    bodies = {account: _sized(event_batch(account, shared_id), size) for account in (601, 602)}
    assert (len(bodies[601]) >= BIG_BODY_BYTES) == (size == "big")
    for account in (601, 602, 601, 602):  # the last two are retries: duplicates
        response = client.post("/firehose", data=bodies[account], headers=AUTH)
        assert response.status_code == 202
    assert inbox(redis_client, keys) == [bodies[601], bodies[602]]
    assert redis_client.xlen(keys.inbox) == 2  # a duplicate's entry is gone, not hidden
    assert all(Marks(redis_client, keys, 86400).seen(shared_id, account) for account in (601, 602))


@pytest.mark.parametrize("size", SIZES)
def test_the_suspension_flag_keeps_its_rules(
    redis_url: str, redis_client: redis_lib.Redis, keys: Keys, size: str
) -> None:
    client = make_app(redis_url, keys).test_client()
    account = 70100 + len(size)
    flag = keys.suspended(account)
    redis_client.set(flag, partner_key("revoked"), ex=600)

    def answer(body: bytes) -> bool:
        response = client.post("/firehose", data=body, headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["suspend_subscription"]

    assert answer(_sized(membership(account, "revoked"), size)) is True
    fixed = membership(account, "fixed-key")
    assert answer(_sized(fixed, size)) is False  # stored with a new key: lifted
    assert not redis_client.exists(flag)
    # Refused again, then mParticle retries the earlier message with another key: a duplicate
    # stores nothing and lifts nothing.
    redis_client.set(flag, partner_key("fixed-key"), ex=600)
    retry = dict(fixed, account={"account_id": account, "account_settings": {"apiKey": "other"}})
    assert answer(_sized(retry, size)) is False
    assert redis_client.get(flag) == partner_key("fixed-key").encode()
    assert redis_client.xlen(keys.inbox) == 2


@pytest.mark.parametrize("size", SIZES)
def test_a_write_no_replica_confirmed_is_503_until_one_does(
    redis_url: str, redis_client: redis_lib.Redis, keys: Keys, size: str
) -> None:
    # The suite's Redis has no replica: WAIT confirms none, ever. A budget that lets WAIT answer
    # "none" before the socket gives up on it, on a busy machine too.
    client = make_app(redis_url, keys, redis_min_replicas=1, ingest_redis_timeout_ms=150).test_client()
    body = _sized(event_batch(603, str(uuid.uuid4())), size)
    for _ in range(2):  # the retry too: its mark alone must not answer 2xx
        response = client.post("/firehose", data=body, headers=AUTH)
        assert response.status_code == 503
    # Never twice: the first copy waits for a replica (unless Redis was too slow to take it).
    assert inbox(redis_client, keys) in ([body], [])


def test_a_big_body_is_stored_after_redis_lost_its_scripts(
    redis_url: str, redis_client: redis_lib.Redis, keys: Keys
) -> None:
    client = make_app(redis_url, keys).test_client()
    redis_client.script_flush()
    body = _sized(event_batch(604, str(uuid.uuid4())), "big")
    assert client.post("/firehose", data=body, headers=AUTH).status_code == 202
    assert client.post("/firehose", data=body, headers=AUTH).status_code == 202
    assert inbox(redis_client, keys) == [body]


def test_each_thread_connection_asks_sentinel_for_the_primary(
    redis_url: str, redis_client: redis_lib.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sentinel stands in by its answer: the suite's Redis is the primary. REDIS_URL's own host is a
    # closed port, so a connection that did not ask would store nothing, or store elsewhere.
    from redis.sentinel import Sentinel

    primary = redis_client.connection_pool.connection_kwargs
    monkeypatch.setattr(Sentinel, "discover_master", lambda *_: (primary["host"], primary["port"]))
    db = primary.get("db", 0)
    client = make_app(
        f"redis://127.0.0.1:9/{db}", keys, redis_sentinels=("127.0.0.1:9",), redis_sentinel_master="relay"
    ).test_client()
    bodies = [_sized(event_batch(605, str(uuid.uuid4())), size) for size in SIZES]
    assert [client.post("/firehose", data=body, headers=AUTH).status_code for body in bodies] == [202, 202]
    assert inbox(redis_client, keys) == bodies
