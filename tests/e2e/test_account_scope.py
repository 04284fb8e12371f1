"""Per-account message ids and the audience suspension flag, through the real web, a Celery
worker, the partner stub and Redis; and REDIS_MIN_REPLICAS against a real primary and replica."""

from __future__ import annotations

import copy
import hashlib
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis as redis_lib
import requests

from devtools.procs import start_web
from devtools.redis_server import RedisServer
from tests.support import BIN, SCOPE_DB, Proc, Stub, base_env, free_port, sample, wait_for
from tests.support.stack import TOKEN, Stack, delivered_events, make_stack

# A database of the suite's Redis no other stack uses (make_stack empties it first).


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def post(url: str, message: dict) -> requests.Response:
    return requests.post(
        f"{url}/firehose", data=orjson.dumps(message), headers={"Authorization": f"Token {TOKEN}"}, timeout=10
    )


def with_account(message: dict, account_id: int, api_key: str | None) -> dict:
    message = copy.deepcopy(message)
    message["account"] = {"account_id": account_id, "account_settings": {"apiKey": api_key} if api_key else {}}
    return message


def membership(message_id: str, audiences: tuple[int, ...]) -> dict:
    return {
        "type": "audience_membership_change_request",
        "id": message_id,
        "timestamp_ms": 1_764_000_000_000,
        "firehose_version": "3.2.0",
        "user_profiles": [
            {
                "mpid": "4242",
                "audiences": [{"audience_id": a, "audience_name": f"aud {a}", "action": "add"} for a in audiences],
            }
        ],
    }


@pytest.fixture(scope="module")
def stack(stub: Stub, logs_dir: Path) -> Iterator[Stack]:
    s = make_stack(SCOPE_DB, stub, logs_dir, "scope", PARTNER_RATE_LIMIT="none")
    yield s
    s.stop()


@pytest.fixture
def partner(stack: Stack, stub: Stub) -> Stub:
    return stack.quiet(stub)


def test_one_message_id_from_two_accounts_reaches_the_partner_for_each(stack: Stack, partner: Stub) -> None:
    shared_id = str(uuid.uuid4())
    batch = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    batch["id"] = shared_id
    # A membership change for two audiences (split into units, each with its own marks), its id
    # shared by the two accounts too.
    change = membership(str(uuid.uuid4()), (111, 222))
    for account_id in (61001, 61002):
        assert post(stack.url, with_account(batch, account_id, f"events-{account_id}")).status_code == 202
        assert post(stack.url, with_account(change, account_id, f"members-{account_id}")).status_code == 200
    event_ids = {event["id"] for event in batch["events"]}
    for account_id in (61001, 61002):
        wait_for(
            lambda a=account_id: set(delivered_events(partner, f"events-{a}")) == event_ids,
            30,
            what=f"account {account_id}'s events",
        )
        for audience in (111, 222):
            scope = f"{sha(f'members-{account_id}')}:{audience}"
            wait_for(lambda s=scope: partner.state()["members"].get(s), 30, what=f"membership {scope}")


def test_a_verification_message_without_a_key_does_not_lift_a_suspension(stack: Stack, partner: Stub) -> None:
    account = 62001
    partner.faults([{"path_prefix": "/v1/audiences", "status": 401, "api_key_sha256": sha("revoked-key")}])
    verification = with_account(membership(str(uuid.uuid4()), ()), account, "revoked-key")
    verification.pop("user_profiles")
    assert (
        post(stack.url, with_account(membership(str(uuid.uuid4()), (111,)), account, "revoked-key")).status_code == 200
    )
    # The worker's call is refused with 401: from then on the account's answers say suspend.
    wait_for(lambda: post(stack.url, verification).json()["suspend_subscription"], 30, what="the suspension")

    keyless = with_account(verification, account, None)
    assert post(stack.url, keyless).json()["suspend_subscription"] is True
    # The refused key is still refused: the next message with it is told so too.
    assert post(stack.url, verification).json()["suspend_subscription"] is True


@pytest.fixture
def replicated(tmp_path: Path, logs_dir: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(tmp_path / "primary", logs_dir, name="wait-primary")
    replica = RedisServer(tmp_path / "replica", logs_dir, name="wait-replica", replica_of=primary)
    for server in (primary, replica):
        server.data_dir.mkdir()
    primary.start()
    replica.start()
    try:
        yield primary, replica
    finally:
        if replica.proc is not None:
            replica.proc.signal(signal.SIGCONT)
        replica.stop()
        primary.stop()


def test_min_replicas_answers_503_while_the_replica_is_stopped(
    replicated: tuple[RedisServer, RedisServer], logs_dir: Path
) -> None:
    primary, replica = replicated
    env = base_env(primary.url, FIREHOSE_AUTH_TOKEN=TOKEN, REDIS_MIN_REPLICAS="1", INGEST_REDIS_TIMEOUT_MS="300")
    web, url = start_web(env, logs_dir, name="wait-web")
    try:
        batch = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))

        def fresh() -> dict:
            return dict(batch, id=str(uuid.uuid4()))

        wait_for(lambda: post(url, fresh()).status_code == 202, 20, what="the replica to be in sync")
        assert replica.proc is not None
        replica.proc.signal(signal.SIGSTOP)
        unconfirmed = fresh()
        for message in (unconfirmed, unconfirmed, fresh()):  # a retry of an unconfirmed message too
            started = time.monotonic()
            answer = post(url, message)
            assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
            assert time.monotonic() - started < 1.0  # the bound
        replica.proc.signal(signal.SIGCONT)
        # mParticle's retry of the unconfirmed message: 2xx once a replica holds it, stored once.
        wait_for(lambda: post(url, unconfirmed).status_code == 202, 20, what="2xx again after SIGCONT")
        assert post(url, fresh()).status_code == 202
        inbox = redis_lib.Redis.from_url(primary.url).xrange("fr:inbox")
        assert [f[b"id"].decode() for _, f in inbox].count(unconfirmed["id"]) == 1
    finally:
        web.stop()


def test_web_and_worker_refuse_to_start_on_an_evicting_redis(tmp_path: Path, logs_dir: Path) -> None:
    server = RedisServer(tmp_path, logs_dir, name="evicting-redis")
    server.start()
    try:
        redis_lib.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")
        env = base_env(server.url, FIREHOSE_AUTH_TOKEN=TOKEN, PORT=str(free_port()))
        commands = {
            "evicting-worker": [str(BIN / "celery"), "-A", "workers.worker", "worker", "--without-mingle"],
            "evicting-web": [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "service:create_app()"],
        }
        for name, argv in commands.items():
            proc = Proc(name, argv, env, logs_dir)
            try:
                assert proc.popen.wait(30) != 0
                assert "maxmemory-policy is 'allkeys-lru'" in proc.output() and "noeviction" in proc.output()
            finally:
                proc.stop()
    finally:
        server.stop()
