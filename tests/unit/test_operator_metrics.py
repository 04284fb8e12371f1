"""The operator's view in /metrics, in this process: how old the oldest waiting message is in each
place one waits, the acceptance -> partner 2xx lag, and label values from a fixed set whatever a
message says. (Through a running stack: tests/e2e/test_operator_view.py.)
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import redis as redis_lib
from celery import Celery
from prometheus_client import generate_latest

from common import stats
from common.config import Settings
from common.keys import Keys
from common.names import DELIVER_TASK, DELIVERY_QUEUE
from service.metrics import RedisCollector
from tests.support import WORKER_CORE_DB, redis_db, sample
from tests.support.metrics import prefix, value
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import body, message
from workers.runtime import Runtime
from workers.tasks import run_attempt


def scrape(settings: Settings) -> str:
    class _Only:
        def collect(self) -> Any:
            return RedisCollector(settings).collect()

    return generate_latest(_Only()).decode()


def _redis_ms(client: redis_lib.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_every_waiting_place_reports_its_oldest_message(redis_url: str, redis_client: redis_lib.Redis) -> None:
    keys = Keys(prefix())
    now = _redis_ms(redis_client)
    settings = Settings(redis_url=redis_url, broker_url=redis_url, key_prefix=keys.prefix)
    empty = scrape(settings)
    for queue in ("inbox", "retry", "dead_letters"):
        # Nothing waits: a series at 0, so an alert on it has something to compare.
        assert value(empty, "firehose_oldest_message_age_seconds", queue=queue) == 0

    # The inbox entry's id is its acceptance time; a lane's head carries first_seen (a retry
    # back in its lane is older than its entry id says), and the older of the two counts.
    redis_client.xadd(keys.inbox, {"body": b"{}"}, id=f"{now - 5_000}-0")
    redis_client.sadd(keys.lanes, "k1", "gone")
    redis_client.xadd(keys.lane("k1"), {"body": b"{}", "first_seen": now - 9_000})
    # The retry schedule is ordered by due time: the oldest message is the one due last here.
    schedule = {
        orjson.dumps({"id": "a", "type": "t", "attempt": 2, "first_seen": now - 1_000, "body": "{}"}): now + 1,
        orjson.dumps({"id": "b", "type": "t", "attempt": 7, "first_seen": now - 20_000, "body": "{}"}): now + 600_000,
    }
    redis_client.zadd(keys.retry_schedule, schedule)
    redis_client.zadd(keys.dead_letter_index, {"x": (now - 30_000) / 1000, "y": now / 1000})

    text = scrape(settings)
    ages = {q: value(text, "firehose_oldest_message_age_seconds", queue=q) for q in ("inbox", "retry", "dead_letters")}
    # Lower bounds from the ages written; the upper ones only say the right entry was picked.
    assert 9 <= ages["inbox"] < 19, ages
    assert 20 <= ages["retry"] < 30, ages
    assert 30 <= ages["dead_letters"] < 40, ages


def test_the_celery_queue_reports_its_head_task_age(redis_url: str) -> None:
    """A task published by Celery itself onto a broker of its own (CELERY_BROKER_URL)."""
    broker_url = redis_db(WORKER_CORE_DB)
    broker = redis_lib.Redis.from_url(broker_url)
    broker.delete(DELIVERY_QUEUE)  # nothing in the fast tier consumes it
    app = Celery("operator-metrics", broker=broker_url)
    first_seen = _redis_ms(broker) - 42_000
    try:
        # The oldest is the one published first: kombu pushes on the left and pops on the right.
        for accepted in (first_seen, first_seen + 40_000):
            kwargs = {"attempt": 1, "first_seen_ms": accepted}
            app.send_task(DELIVER_TASK, args=["{}"], kwargs=kwargs, queue=DELIVERY_QUEUE)
        settings = Settings(redis_url=redis_url, broker_url=broker_url, key_prefix=prefix())
        text = scrape(settings)
        assert value(text, "firehose_queue_depth", queue="celery") == 2
        assert 42 <= value(text, "firehose_oldest_message_age_seconds", queue="celery") < 52
    finally:
        broker.delete(DELIVERY_QUEUE)
        app.close()


def test_a_delivery_records_its_lag_from_acceptance_by_type(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    accepted = time.time_ns() // 1_000_000 - 3_000
    run_attempt([body(message())], 1, accepted, grouped=False, rt=rt)
    settings = Settings(redis_url=rt.settings.redis_url, broker_url=rt.settings.redis_url, key_prefix=rt.keys.prefix)
    text = scrape(settings)
    kind = "event_processing_request"
    assert value(text, "firehose_messages_delivered_total") == 1
    assert value(text, "firehose_delivery_lag_seconds_count", type=kind) == 1
    assert value(text, "firehose_delivery_lag_seconds_bucket", type=kind, le="2.5") == 0
    assert value(text, "firehose_delivery_lag_seconds_bucket", type=kind, le="5.0") == 1
    assert 3 <= value(text, "firehose_delivery_lag_seconds_sum", type=kind) < 5


def test_a_dsr_type_of_100_kb_adds_no_label_and_no_bytes(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    settings = Settings(redis_url=rt.settings.redis_url, broker_url=rt.settings.redis_url, key_prefix=rt.keys.prefix)

    def dsr(request_type: str) -> str:
        msg = orjson.loads(sample("3.2.0", "DsrProcessingRequest.json"))
        msg["id"] = str(uuid.uuid4())
        msg["subject_request_type"] = request_type
        return orjson.dumps(msg).decode()

    run_attempt([dsr("access")], 1, None, grouped=False, rt=rt)
    before = scrape(settings)
    for request_type in ("x" * 100_000, "y" * 100_000, "access\n# forged"):
        run_attempt([dsr(request_type)], 1, None, grouped=False, rt=rt)
    after = scrape(settings)
    assert len(after) - len(before) < 1024
    stored = {k.decode(): int(v) for k, v in rt.redis.hgetall(rt.keys.skipped_events).items()}
    assert stored == {"unsupported_dsr_type:access": 1, "unsupported_dsr_type:other": 3}
    assert value(after, "firehose_skipped_events_total", reason="unsupported_dsr_type:other") == 3


def test_label_values_come_from_a_fixed_set() -> None:
    assert stats.skip_reason("invalid:products.position") == "invalid:products.position"
    # A settings map's own keys are the sender's: cut back to the field the schemas declare.
    assert stats.skip_reason("invalid:user_attributes.my-own-key") == "invalid:user_attributes"
    assert stats.skip_reason("notification:invalid:consent_state.z" * 1000).startswith("notification:invalid:")
    assert stats.skip_reason("invalid:" + "a." * 50_000) == "invalid:other"
    assert stats.skip_reason("made up") == "other"
    assert stats.message_label("x" * 1000) == "other"
    assert stats.counter_label("partner_calls") == "partner_calls"
    assert stats.counter_label("Bad Name\n") == "other"
