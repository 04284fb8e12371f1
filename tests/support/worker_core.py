"""The worker core in process, for unit tests: a Runtime on the suite's Redis under a key prefix
of its own, with a partner client the test scripts, and messages with fresh ids."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import redis

from common.config import Settings
from devtools.faults import fresh_message
from tests.support import WORKER_CORE_DB, redis_db
from tests.support.partner_clients import ScriptedPartnerClient
from workers.runtime import Runtime, build_runtime

EVENTS_MESSAGE = "event_processing_request"
MEMBERSHIP_MESSAGE = "audience_membership_change_request"
SUBSCRIPTION_MESSAGE = "audience_subscription_request"


def core_settings(**changes: Any) -> Settings:
    """Settings for one test: its own key prefix, no rate limit, short waits unless changed."""
    values: dict[str, Any] = {
        "redis_url": redis_db(WORKER_CORE_DB),
        "key_prefix": f"t{uuid.uuid4().hex[:12]}",
        "partner_rate_limit": "none",
        "retry_backoff_base": 0.01,
        "retry_backoff_max": 0.05,
        "pump_block_ms": 10,
        "delivery_batch_wait_ms": 0,
    }
    return Settings(**(values | changes))


def core_runtime(partner: ScriptedPartnerClient | None = None, **changes: Any) -> Runtime:
    return build_runtime(core_settings(**changes), partner=partner or ScriptedPartnerClient())


def client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def message(kind: str = EVENTS_MESSAGE, api_key: str = "key-a", events: int = 2) -> dict[str, Any]:
    return fresh_message(kind, api_key, events=events)


def body(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg).decode()


def take_inbox(rt: Runtime) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of the inbox and the lanes (where due retries go back), removed from its
    stream as the pump does once it published them."""
    streams = [rt.keys.inbox] + [rt.keys.lane(lane.decode()) for lane in sorted(rt.redis.smembers(rt.keys.lanes))]
    taken = []
    for stream in streams:
        entries = rt.redis.xrange(stream)
        if entries:
            rt.redis.xdel(stream, *[entry_id for entry_id, _ in entries])
        taken += entries
    return taken


def run_inbox(rt: Runtime) -> list[tuple[dict[bytes, bytes], Any]]:
    """Run each inbox entry once as the pump and `firehose.deliver` would (the units of a split
    message, say); returns each entry's fields with its task's decision."""
    from workers.tasks import run_attempt  # the tasks module pulls in Celery: only when asked

    ran = []
    for _, fields in take_inbox(rt):
        attempt = int(fields.get(b"attempt", b"1"))
        first_seen = int(fields[b"first_seen"]) if b"first_seen" in fields else None
        ran.append((fields, run_attempt([fields[b"body"].decode()], attempt, first_seen, grouped=False, rt=rt)))
    return ran
