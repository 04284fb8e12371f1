"""GET /metrics, in this process: what Redis holds at scrape time, the request-side counters and
gunicorn's hooks. Each test writes its Redis state under a key prefix of its own, so what other
tests queue or count never shows up in its numbers. (A real gunicorn with two workers, summing
its workers' counters: tests/e2e/test_metrics.py.)
"""

from __future__ import annotations

import logging
import os
import runpy
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import orjson
import pytest
import redis as redis_lib
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common import stats
from common.config import Settings
from common.keys import Keys
from service import create_app
from service.metrics import RedisCollector
from tests.support import ROOT
from tests.support.metrics import AUTH, TOKEN, event_batch, prefix, value


def collect_text(collector: RedisCollector) -> str:
    class _Only:
        def collect(self) -> Any:
            return collector.collect()

    return generate_latest(_Only()).decode()


# ------------------------------------------------------------------ Redis at scrape time


def test_worker_stats_written_with_common_stats_are_exported(redis_url: str, redis_client: redis_lib.Redis) -> None:
    keys = Keys(prefix())
    stats.incr(redis_client, keys, stats.DELIVERED, 3)
    stats.incr(redis_client, keys, stats.RETRIED)
    stats.incr(redis_client, keys, stats.DEAD_LETTERED, 2)
    stats.incr(redis_client, keys, stats.RATE_LIMITED, 4)
    stats.incr(redis_client, keys, stats.PARTNER_CALLS, 7)
    stats.incr(redis_client, keys, "brand_new_counter", 5)
    for seconds in (0.003, 0.02, 0.2, 30.0):
        stats.record_latency(redis_client, keys, seconds)
    redis_client.hincrby(keys.skipped_events, "unknown_type", 6)
    redis_client.hincrby(keys.skipped_events, "invalid:products.position", 1)
    redis_client.xadd(keys.inbox, {"body": b"{}"})
    redis_client.xadd(keys.inbox, {"body": b"{}"})
    redis_client.zadd(keys.retry_schedule, {"a": 1, "b": 2, "c": 3})
    redis_client.zadd(keys.dead_letter_index, {"x": time.time()})

    settings = Settings(redis_url=redis_url, broker_url=redis_url, key_prefix=keys.prefix)
    text = collect_text(RedisCollector(settings))

    assert value(text, "firehose_redis_up") == 1
    assert value(text, "firehose_messages_delivered_total") == 3
    assert value(text, "firehose_delivery_retries_total") == 1
    assert value(text, "firehose_messages_dead_lettered_total") == 2
    assert value(text, "firehose_rate_limited_waits_total") == 4
    assert value(text, "firehose_partner_calls_total") == 7
    assert value(text, "firehose_worker_events_total", counter="brand_new_counter") == 5
    assert value(text, "firehose_skipped_events_total", reason="unknown_type") == 6
    assert value(text, "firehose_skipped_events_total", reason="invalid:products.position") == 1
    assert value(text, "firehose_queue_depth", queue="inbox") == 2
    assert value(text, "firehose_queue_depth", queue="retry") == 3
    assert value(text, "firehose_queue_depth", queue="celery") is not None
    assert value(text, "firehose_queue_depth", queue="unacked") is not None
    assert value(text, "firehose_dead_letters") == 1

    # A real histogram: cumulative buckets, +Inf = count, and the sum.
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "firehose_partner_latency_seconds"]
    assert family.type == "histogram"
    assert value(text, "firehose_partner_latency_seconds_bucket", le="0.005") == 1
    assert value(text, "firehose_partner_latency_seconds_bucket", le="0.025") == 2
    assert value(text, "firehose_partner_latency_seconds_bucket", le="0.25") == 3
    assert value(text, "firehose_partner_latency_seconds_bucket", le="10.0") == 3
    assert value(text, "firehose_partner_latency_seconds_bucket", le="+Inf") == 4
    assert value(text, "firehose_partner_latency_seconds_count") == 4
    assert value(text, "firehose_partner_latency_seconds_sum") == pytest.approx(30.223)


def test_known_worker_counters_are_zero_before_any_delivery(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, broker_url=redis_url, key_prefix=prefix())
    text = collect_text(RedisCollector(settings))
    assert value(text, "firehose_messages_delivered_total") == 0
    assert value(text, "firehose_partner_latency_seconds_count") == 0
    assert value(text, "firehose_partner_latency_seconds_bucket", le="+Inf") == 0


def test_redis_memory_is_exported_for_sizing(redis_url: str, redis_client: redis_lib.Redis) -> None:
    settings = Settings(redis_url=redis_url, broker_url=redis_url, key_prefix=prefix())
    keys = Keys(settings.key_prefix)
    redis_client.set(f"{keys.prefix}:example", "1", ex=60)
    text = collect_text(RedisCollector(settings))
    info = redis_client.info("memory")
    used = value(text, "firehose_redis_used_memory_bytes")
    assert used is not None and 0.5 * info["used_memory"] < used < 2 * info["used_memory"]
    assert value(text, "firehose_redis_maxmemory_bytes") == info["maxmemory"]
    assert value(text, "firehose_redis_keys") >= 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes TCP handshakes (the listen backlog) and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def test_redis_down_is_redis_up_0_not_a_failed_scrape() -> None:
    down = f"redis://127.0.0.1:{_closed_port()}/0"
    app = create_app(Settings(redis_url=down, broker_url=down, auth_tokens=(TOKEN,)))
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert value(text, "firehose_redis_up") == 0
    assert value(text, "firehose_dead_letters") is None
    # The process's own metrics are still there.
    assert "# TYPE firehose_requests_total counter" in text


def test_redis_hanging_does_not_hang_the_scrape(silent_port: int) -> None:
    hung = f"redis://127.0.0.1:{silent_port}/0"
    app = create_app(Settings(redis_url=hung, broker_url=hung, metrics_redis_timeout_ms=200))
    started = time.monotonic()
    response = app.test_client().get("/metrics")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert value(response.get_data(as_text=True), "firehose_redis_up") == 0
    assert elapsed < 3, elapsed


def test_a_broker_of_its_own_is_read_separately(redis_url: str, silent_port: int) -> None:
    settings = Settings(redis_url=redis_url, broker_url=f"redis://127.0.0.1:{_closed_port()}/0", key_prefix=prefix())
    text = collect_text(RedisCollector(settings, timeout_ms=200))
    # The state store answered; the broker did not, so only its queues are missing.
    assert value(text, "firehose_redis_up") == 1
    assert value(text, "firehose_queue_depth", queue="inbox") == 0
    assert value(text, "firehose_queue_depth", queue="celery") is None


# ------------------------------------------------------------- the request-side metrics


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_request_ingest_and_enqueue_failure_counters_in_process(redis_url: str) -> None:
    key_prefix = prefix()
    settings = Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=(TOKEN,), key_prefix=key_prefix)
    client = create_app(settings).test_client()
    kind = "event_processing_request"
    before = {
        "202": _sample("firehose_requests_total", type=kind, status="202"),
        "401": _sample("firehose_requests_total", type=kind, status="401"),
        "400": _sample("firehose_requests_total", type="unknown", status="400"),
        "queued": _sample("firehose_ingest_total", type=kind, outcome="queued"),
        "duplicate": _sample("firehose_ingest_total", type=kind, outcome="duplicate"),
        "verification": _sample("firehose_ingest_total", type=kind, outcome="verification"),
        "failed": _sample("firehose_enqueue_failures_total", type=kind),
        "latency": _sample("firehose_request_duration_seconds_count", type=kind),
        "scrapes": _sample("firehose_requests_total", type="unknown", status="200"),
    }
    body = event_batch()
    assert client.post("/firehose", data=body, headers=AUTH).status_code == 202
    assert client.post("/firehose", data=body, headers=AUTH).status_code == 202
    assert client.post("/firehose", data=event_batch(events=False), headers=AUTH).status_code == 202
    assert client.post("/firehose", data=body).status_code == 401
    assert client.post("/firehose", data=b"{not json", headers=AUTH).status_code == 400
    down = f"redis://127.0.0.1:{_closed_port()}/0"
    broken = create_app(settings.model_copy(update={"redis_url": down, "broker_url": down})).test_client()
    assert broken.post("/firehose", data=event_batch(), headers=AUTH).status_code == 503
    client.get("/healthz")

    assert _sample("firehose_requests_total", type=kind, status="202") - before["202"] == 3
    assert _sample("firehose_requests_total", type=kind, status="401") - before["401"] == 1
    assert _sample("firehose_requests_total", type="unknown", status="400") - before["400"] == 1
    assert _sample("firehose_ingest_total", type=kind, outcome="queued") - before["queued"] == 1
    assert _sample("firehose_ingest_total", type=kind, outcome="duplicate") - before["duplicate"] == 1
    assert _sample("firehose_ingest_total", type=kind, outcome="verification") - before["verification"] == 1
    assert _sample("firehose_enqueue_failures_total", type=kind) - before["failed"] == 1
    assert _sample("firehose_request_duration_seconds_count", type=kind) - before["latency"] == 5
    # Health checks are not Firehose requests.
    assert _sample("firehose_requests_total", type="unknown", status="200") == before["scrapes"]


def test_a_made_up_type_does_not_make_a_label(redis_url: str) -> None:
    client = create_app(Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=(TOKEN,))).test_client()
    made_up = f"type_{uuid.uuid4().hex}"
    body = orjson.dumps({"type": made_up, "id": str(uuid.uuid4()), "timestamp_ms": 1})
    assert client.post("/firehose", data=body, headers=AUTH).status_code == 400
    assert made_up not in client.get("/metrics").get_data(as_text=True)


# ---------------------------------------------------------------- gunicorn's hooks


@pytest.fixture
def gunicorn_conf() -> Iterator[dict[str, Any]]:
    # The hooks set os.environ directly: restore all of it, or every process this test run
    # starts later would inherit a metrics directory that no longer exists.
    with mock.patch.dict(os.environ):
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        os.environ.pop("FIREHOSE_PRIVATE_METRICS_DIR", None)
        os.environ.setdefault("FIREHOSE_AUTH_TOKEN", TOKEN)  # the file stops without one
        yield runpy.run_path(str(ROOT / "gunicorn.conf.py"))


# Quacks like gunicorn's Arbiter as far as the hooks look at it.
_SERVER = SimpleNamespace(log=logging.getLogger("tests.gunicorn"))


def test_gunicorn_makes_a_private_metrics_dir_and_removes_it(gunicorn_conf: dict[str, Any]) -> None:
    gunicorn_conf["on_starting"](_SERVER)
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert directory.is_dir()
    gunicorn_conf["on_exit"](_SERVER)
    assert not directory.exists()


def test_gunicorn_clears_stale_files_from_a_given_dir(
    gunicorn_conf: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "keep.txt").write_text("not ours")
    gunicorn_conf["on_starting"](_SERVER)
    gunicorn_conf["on_exit"](_SERVER)
    # Only prometheus_client's files go, and a directory the operator gave is kept.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
