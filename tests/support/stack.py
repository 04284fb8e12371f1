"""A whole stack under test: gunicorn and Celery workers on a database of the suite's Redis,
delivering to the partner stub. Used by the delivery, audience and fault tests."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis as redis_lib
import requests

from common.keys import BACKLOG_LUA, Keys
from common.names import DELIVERY_QUEUE
from devtools.procs import start_web, start_worker
from tests.support import Proc, Stub, base_env, redis_db, sample, wait_for

TOKEN = "policy-token"
KEYS = Keys("fr")
# What every fault stack runs with: no partner limit in the way, attempts enough to outlast an
# outage of several seconds, and a dead worker's messages back within seconds, not minutes.
FAULT_SETTINGS = {
    "PARTNER_RATE_LIMIT": "1000/second",
    "RETRY_MAX_ATTEMPTS": "40",
    "BROKER_VISIBILITY_TIMEOUT": "6",
    "PUMP_CLAIM_IDLE_MS": "2000",
}


@dataclass
class Stack:
    url: str
    redis_url: str
    redis: redis_lib.Redis
    env: dict[str, str]
    workers: list[Proc]
    logs_dir: Path

    def send(self, api_key: str, events: int = 2) -> dict:
        """An event batch with fresh message and event ids, posted to the web."""
        message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
        message["id"] = str(uuid.uuid4())
        message["account"]["account_settings"]["apiKey"] = api_key
        template = message["events"][0]
        message["events"] = [dict(template, id=str(uuid.uuid4())) for _ in range(events)]
        response = requests.post(
            f"{self.url}/firehose",
            data=orjson.dumps(message),
            headers={"Authorization": f"Token {TOKEN}"},
            timeout=10,
        )
        assert response.status_code == 202, response.text
        return message

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop()

    def quiet(self, stub: Stub) -> Stub:
        """The stub, reset once this stack has finished with what earlier tests queued."""
        wait_for(self.drained, 60, what="earlier work to drain")
        stub.reset()
        return stub

    def drained(self) -> bool:
        """Nothing in the inbox, the pump's lanes, the retry schedule, Celery's queue or a worker's hands.

        Asked twice, a little apart: a task moving from Celery's queue to a worker's unacked
        set is briefly in neither.
        """
        r = self.redis

        def empty() -> bool:
            # Entries leave the inbox and the lanes only once they moved on, so a message read
            # but not yet published still counts here.
            backlog, _lanes = r.eval(BACKLOG_LUA, 2, KEYS.inbox, KEYS.lanes, KEYS.lane_prefix)
            return (
                int(backlog) == 0
                and r.zcard(KEYS.retry_schedule) == 0
                and r.llen(DELIVERY_QUEUE) == 0
                and r.hlen("unacked") == 0
            )

        if not empty():
            return False
        time.sleep(0.3)
        return empty()


def sha(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def calls_for(stub: Stub, api_key: str) -> list[dict]:
    return [r for r in stub.requests("/v1/events") if r["api_key_sha256"] == sha(api_key)]


def delivered_events(stub: Stub, api_key: str) -> dict[str, int]:
    return stub.state()["events_by_api_key"].get(sha(api_key), {})


def all_event_ids(messages: list[dict]) -> set[str]:
    return {event["id"] for message in messages for event in message["events"]}


def make_stack(db: int, stub: Stub, logs_dir: Path, name: str, workers: int = 1, **env: str) -> Stack:
    redis_url = redis_db(db)
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    settings = {
        "PARTNER_API_URL": stub.url,
        "FIREHOSE_AUTH_TOKEN": TOKEN,
        "RETRY_BACKOFF_BASE": "0.2",
        "RETRY_BACKOFF_MAX": "1",
        "RETRY_MAX_ATTEMPTS": "5",
        "PARTNER_TIMEOUT_SECONDS": "4",
    }
    environment = base_env(redis_url, **(settings | env))
    procs = [start_worker(f"{name}-worker{i}", environment, logs_dir) for i in range(workers)]
    web_proc, url = start_web(environment, logs_dir, name=f"{name}-web")
    procs.append(web_proc)
    return Stack(url, redis_url, client, environment, procs, logs_dir)


@contextmanager
def started_stack(db: int, stub: Stub, logs_dir: Path, name: str, workers: int = 1, **env: str) -> Iterator[Stack]:
    """make_stack's stack, stopped for sure when the block ends (a module fixture's whole life)."""
    stack = make_stack(db, stub, logs_dir, name, workers, **env)
    try:
        yield stack
    finally:
        stack.stop()
