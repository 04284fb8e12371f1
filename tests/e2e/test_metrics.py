"""GET /metrics from a real gunicorn with two workers: each scrape sums every worker's counters,
and worker-side stats written to Redis reach it. (The in-process tests: tests/unit/test_metrics.py.)
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests

from common import stats
from common.keys import Keys
from devtools.procs import start_web
from tests.support import base_env, wait_for
from tests.support.metrics import AUTH, TOKEN, event_batch, prefix, value


@pytest.fixture(scope="module")
def gunicorn_web(redis_url: str, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    metrics_dir = tmp_path_factory.mktemp("multiproc")
    key_prefix = prefix()
    env = base_env(
        redis_url, FIREHOSE_AUTH_TOKEN=TOKEN, REDIS_KEY_PREFIX=key_prefix, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)
    )
    proc, url = start_web(env, logs_dir, name="web-metrics")
    try:
        yield {"url": url, "dir": metrics_dir, "keys": Keys(key_prefix), "proc": proc}
    finally:
        proc.stop()


def _scrape(url: str) -> str:
    response = requests.get(f"{url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text


def _pids_with_counters(directory: Path) -> set[str]:
    return {m.group(1) for p in directory.glob("counter_*.db") if (m := re.fullmatch(r"counter_(\d+)\.db", p.name))}


def test_counters_move_and_are_summed_over_gunicorn_workers(
    gunicorn_web: dict[str, Any], redis_client: redis_lib.Redis
) -> None:
    url = gunicorn_web["url"]
    kind = "event_processing_request"
    before = _scrape(url)
    sent = {"202": 0, "401": 0}

    def post(authorized: bool) -> int:
        # A new connection each time, so the kernel spreads them over both workers.
        response = requests.post(f"{url}/firehose", data=event_batch(), headers=AUTH if authorized else {}, timeout=5)
        return response.status_code

    lock = threading.Lock()

    def burst() -> None:
        with ThreadPoolExecutor(8) as pool:
            for status in pool.map(post, [True] * 12 + [False] * 4):
                with lock:
                    sent[str(status)] += 1

    # Keep sending until both workers have answered some of it (each writes its own file).
    wait_for(lambda: burst() or len(_pids_with_counters(gunicorn_web["dir"])) >= 2, 30, 0, "both workers to count")

    def moved(text: str, status: str) -> float:
        return (value(text, "firehose_requests_total", type=kind, status=status) or 0) - (
            value(before, "firehose_requests_total", type=kind, status=status) or 0
        )

    # Several scrapes, answered by either worker: each one sees every worker's requests.
    for _ in range(6):
        text = _scrape(url)
        assert moved(text, "202") == sent["202"]
        assert moved(text, "401") == sent["401"]
        queued = (value(text, "firehose_ingest_total", type=kind, outcome="queued") or 0) - (
            value(before, "firehose_ingest_total", type=kind, outcome="queued") or 0
        )
        assert queued == sent["202"]
        latency = (value(text, "firehose_request_duration_seconds_count", type=kind) or 0) - (
            value(before, "firehose_request_duration_seconds_count", type=kind) or 0
        )
        assert latency == sent["202"] + sent["401"]

    # Stored under this server's prefix, and counted at scrape time.
    assert value(_scrape(url), "firehose_queue_depth", queue="inbox") == redis_client.xlen(gunicorn_web["keys"].inbox)


def test_worker_side_stats_reach_the_web_scrape(gunicorn_web: dict[str, Any], redis_client: redis_lib.Redis) -> None:
    keys = gunicorn_web["keys"]
    stats.incr(redis_client, keys, stats.DELIVERED, 11)
    stats.incr(redis_client, keys, stats.PARTNER_CALLS, 12)
    stats.record_latency(redis_client, keys, 0.04)
    redis_client.hincrby(keys.skipped_events, "invalid:event", 2)
    text = _scrape(gunicorn_web["url"])
    assert value(text, "firehose_redis_up") == 1
    assert value(text, "firehose_messages_delivered_total") == 11
    assert value(text, "firehose_partner_calls_total") == 12
    assert value(text, "firehose_partner_latency_seconds_bucket", le="0.05") == 1
    assert value(text, "firehose_partner_latency_seconds_bucket", le="0.025") == 0
    assert value(text, "firehose_skipped_events_total", reason="invalid:event") == 2


def test_metrics_dir_is_private_when_unset(redis_url: str, logs_dir: Path) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR the server makes its own, and still sums its workers."""
    env = base_env(redis_url, FIREHOSE_AUTH_TOKEN=TOKEN, REDIS_KEY_PREFIX=prefix())
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc, url = start_web(env, logs_dir, name="web-metrics-private")
    try:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(
                    lambda _: requests.post(f"{url}/firehose", data=event_batch(), headers=AUTH, timeout=5).status_code,
                    range(8),
                )
            )
        assert statuses == [202] * 8
        for _ in range(4):
            assert value(_scrape(url), "firehose_requests_total", type="event_processing_request", status="202") == 8
    finally:
        proc.stop()
