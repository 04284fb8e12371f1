"""Prometheus metrics at `GET /metrics`.

Two sources, one scrape:

* What each web process counts as it answers (requests, latency, ingest outcomes, enqueue
  failures). Under gunicorn these are prometheus_client multi-process metrics: every worker
  process writes its own files in PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py sets it up) and a
  scrape, answered by any one worker, sums them all.
* What lives in Redis, read at scrape time by `RedisCollector` in one pipelined round trip:
  queue depths, dead letters, skipped events, and the delivery counters and partner latency
  histogram that every worker on every host adds to (common/stats.py). So the workers need no
  scrape target of their own, and the numbers are the same whichever web process answers.

The request path pays two metric updates per request and no Redis call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from common import stats
from common.config import Settings
from common.keys import BACKLOG_LUA, Keys
from common.names import DELIVERY_QUEUE
from common.redis_conn import ingest_client
from schemas.messages import REQUEST_TYPES, RESPONSE_TYPES

# Process plumbing, not a setting: gunicorn.conf.py sets it for its workers at server start,
# and prometheus_client itself reads it from the environment.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Celery's queue is a Redis list named after it; tasks workers hold sit in kombu's "unacked" hash.
CELERY_QUEUE = DELIVERY_QUEUE
CELERY_UNACKED = "unacked"

# Sized around mParticle's 100 ms answer budget.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_KNOWN_TYPES = REQUEST_TYPES | RESPONSE_TYPES

REQUESTS = Counter(
    "firehose_requests",
    "Firehose messages answered, by message type and HTTP status.",
    ["type", "status"],
)
REQUEST_LATENCY = Histogram(
    "firehose_request_duration_seconds",
    "Time to answer a Firehose message, from routing to response, by message type.",
    ["type"],
    buckets=LATENCY_BUCKETS,
)
INGEST = Counter(
    "firehose_ingest",
    "Messages with work to do, by outcome: queued (stored now), duplicate (id seen before), "
    "verification (nothing to queue).",
    ["type", "outcome"],
)
ENQUEUE_FAILURES = Counter(
    "firehose_enqueue_failures",
    "Messages answered 503 because Redis did not store them within INGEST_REDIS_TIMEOUT_MS.",
    ["type"],
)

# Worker counters in the Keys.stats hash, exported under these names.
WORKER_COUNTERS = {
    stats.DELIVERED: ("firehose_messages_delivered", "Messages whose every partner call was answered 2xx."),
    stats.RETRIED: ("firehose_delivery_retries", "Delivery attempts that failed transiently and were scheduled again."),
    stats.DEAD_LETTERED: ("firehose_messages_dead_lettered", "Messages moved to the dead letters."),
    stats.RATE_LIMITED: (
        "firehose_rate_limited_waits",
        "Partner calls that waited for the rate limit or a Retry-After pause.",
    ),
    stats.PARTNER_CALLS: ("firehose_partner_calls", "Partner calls made, whatever the answer."),
    stats.BREAKER_OPENED: (
        "firehose_partner_breaker_openings",
        "Times an API key's circuit breaker opened (its endpoint kept failing) or reopened (its probe failed).",
    ),
}


def type_label(kind: Any) -> str:
    """A bounded label: a client must not be able to mint a time series per request."""
    return kind if isinstance(kind, str) and kind in _KNOWN_TYPES else "unknown"


# labels() validates and looks its child up under a lock on every call; the request path asks
# for the same few children again and again, so they are kept here once made. Bounded: the
# types by type_label, the rest by the code (outcomes, HTTP statuses).
_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def count_ingest(kind: str, outcome: str) -> None:
    _child(INGEST, type_label(kind), outcome).inc()


def count_enqueue_failure(kind: str) -> None:
    ENQUEUE_FAILURES.labels(type_label(kind)).inc()


# ----------------------------------------------------------------- scrape-time Redis


def _is_number(raw: Any) -> bool:
    try:
        float(raw)
    except (TypeError, ValueError):
        return False
    return True


def _int(raw: Any) -> int:
    """A Redis counter's value; something unreadable counts as 0 rather than failing the scrape."""
    try:
        return int(raw)
    except (TypeError, ValueError):
        return int(float(raw)) if _is_number(raw) else 0


def _decode(raw: dict[bytes, bytes]) -> dict[str, bytes]:
    return {key.decode("utf-8", "replace"): value for key, value in raw.items()}


class RedisCollector:
    """Reads the shared state at scrape time; a Redis outage yields firehose_redis_up 0, not an error."""

    def __init__(self, settings: Settings, timeout_ms: int | None = None) -> None:
        # Past METRICS_REDIS_TIMEOUT_MS (each of connect and reply) the scrape still answers,
        # with firehose_redis_up 0.
        if timeout_ms is None:
            timeout_ms = settings.metrics_redis_timeout_ms
        self.keys = Keys(settings.key_prefix)
        # One attempt, bounded: a scrape that hangs on Redis would tie up a web worker.
        self.client = ingest_client(settings.redis_url, timeout_ms, settings.redis_ssl_cert_reqs)
        same_server = settings.broker_url in ("", settings.redis_url)
        self.broker = (
            None if same_server else ingest_client(settings.broker_url, timeout_ms, settings.redis_ssl_cert_reqs)
        )

    def describe(self) -> list[Metric]:
        # Nothing to declare up front; registering must not cost a Redis round trip.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("firehose_redis_up", "1 when the scrape could read Redis, else 0.")
        pipe = self.client.pipeline(transaction=False)
        # The backlog not yet handed to Celery: the inbox and the pump's per-key lanes.
        pipe.eval(BACKLOG_LUA, 2, self.keys.inbox, self.keys.lanes, self.keys.lane_prefix)
        pipe.zcard(self.keys.retry_schedule)
        pipe.zcard(self.keys.dead_letter_index)
        pipe.hgetall(self.keys.skipped_events)
        pipe.hgetall(self.keys.stats)
        pipe.hgetall(self.keys.partner_latency)
        # Not a series per API key: how many are open. Forgotten breakers (no call came for them
        # since) may linger in the set until the next opening prunes it; they are not counted.
        pipe.zcount(self.keys.breakers_open, time.time_ns() // 1_000_000 - stats.BREAKER_FORGET_MS, "+inf")
        if self.broker is None:
            pipe.llen(CELERY_QUEUE)
            pipe.hlen(CELERY_UNACKED)
        try:
            results = pipe.execute()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        backlog, retry, dead, skipped, counters, latency, breakers, *celery = results
        inbox, lanes = (int(n) for n in backlog)
        if self.broker is not None:
            celery = self._broker_depths(self.broker)

        depth = GaugeMetricFamily(
            "firehose_queue_depth",
            "Messages waiting: inbox (accepted, not yet handed to Celery: the inbox and the pump's lanes), "
            "celery (Celery's queue), unacked (tasks workers hold), retry (the retry schedule).",
            labels=["queue"],
        )
        depth.add_metric(["inbox"], inbox)
        depth.add_metric(["retry"], retry)
        if celery:
            depth.add_metric(["celery"], celery[0])
            depth.add_metric(["unacked"], celery[1])
        yield depth
        # A count, never a series per API key.
        yield GaugeMetricFamily("firehose_lanes", "Per-API-key lanes the pump takes turns across.", lanes)

        yield GaugeMetricFamily("firehose_dead_letters", "Dead letters waiting to be inspected or replayed.", dead)
        yield GaugeMetricFamily(
            "firehose_partner_breakers_open",
            "Partner API keys whose circuit breaker is open or half-open (their calls wait in the retry schedule).",
            breakers,
        )

        skipped_family = CounterMetricFamily(
            "firehose_skipped_events", "Events left out of a delivered batch, by reason.", labels=["reason"]
        )
        for reason, value in sorted(_decode(skipped).items()):
            skipped_family.add_metric([reason], _int(value))
        yield skipped_family

        yield from self._worker_counters(_decode(counters))
        yield self._latency(_decode(latency))
        yield from self._memory(self.client)

    @staticmethod
    def _memory(client: redis.Redis) -> Iterable[Metric]:
        # Dedupe marks live DEDUP_TTL_SECONDS each, so memory grows with rate x TTL (README,
        # "Sizing Redis"); Redis runs noeviction, so a full one refuses new messages (503s).
        # A server that forbids INFO (some managed ones rename it) just leaves these out.
        try:
            memory = client.info("memory")
            keys = client.dbsize()
        except redis.RedisError:
            return
        yield GaugeMetricFamily(
            "firehose_redis_used_memory_bytes", "Memory Redis uses (INFO used_memory).", memory.get("used_memory", 0)
        )
        yield GaugeMetricFamily(
            "firehose_redis_maxmemory_bytes",
            "Redis's memory limit (INFO maxmemory); 0: none set.",
            memory.get("maxmemory", 0),
        )
        yield GaugeMetricFamily("firehose_redis_keys", "Keys in the relay's Redis database: mostly dedupe marks.", keys)

    @staticmethod
    def _broker_depths(broker: redis.Redis) -> list[int]:
        # A broker of its own (CELERY_BROKER_URL): its queues are left out when it does not answer.
        try:
            pipe = broker.pipeline(transaction=False)
            pipe.llen(CELERY_QUEUE)
            pipe.hlen(CELERY_UNACKED)
            return list(pipe.execute())
        except redis.RedisError:
            return []

    @staticmethod
    def _worker_counters(values: dict[str, bytes]) -> Iterable[Metric]:
        # Known counters always appear (0 before the first delivery), so dashboards have a series.
        for field, (name, documentation) in WORKER_COUNTERS.items():
            yield CounterMetricFamily(name, documentation, _int(values.get(field, 0)))
        others = sorted(set(values) - set(WORKER_COUNTERS))
        if others:
            family = CounterMetricFamily(
                "firehose_worker_events", "Other counters the workers keep in Redis, by name.", labels=["counter"]
            )
            for field in others:
                family.add_metric([field], _int(values[field]))
            yield family

    @staticmethod
    def _latency(values: dict[str, bytes]) -> Metric:
        bounds: dict[float, int] = {bound: 0 for bound in stats.LATENCY_BUCKETS}
        for field, value in values.items():
            if field.startswith("le_") and _is_number(field[3:]):
                bounds[float(field[3:])] = _int(value)
        count = _int(values.get("count", 0))
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound in sorted(bounds):
            # Buckets are written by a non-transactional pipeline: a scrape between its
            # commands could see a smaller bucket after a larger one. Keep them cumulative.
            running = max(running, bounds[bound])
            buckets.append((floatToGoString(bound), running))
        buckets.append(("+Inf", max(running, count)))
        total = values.get("sum", 0)
        return HistogramMetricFamily(
            "firehose_partner_latency_seconds",
            "Partner call latency, across every worker.",
            buckets=buckets,
            sum_value=float(total) if _is_number(total) else 0.0,
        )


class _Scrape:
    """What one scrape exposes: this process's (or all processes') metrics, then Redis's."""

    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_DIR_ENV) or None


# ---------------------------------------------------------------------------- Flask

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    scrape: _Scrape = current_app.extensions["metrics_scrape"]
    return Response(generate_latest(scrape), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _start() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    # Only the Firehose endpoint: scrapes and health checks would swamp its latency.
    if request.blueprint == "firehose":
        kind = type_label((g.get("message_fields") or {}).get("message_type"))
        _child(REQUESTS, kind, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:
            _child(REQUEST_LATENCY, kind).observe(time.perf_counter() - started)
    return response


def init_app(app: Flask) -> None:
    settings: Settings = app.config["SETTINGS"]
    directory = multiprocess_dir()
    if directory:
        # A process that shares the web's environment but not its disk (a worker container
        # given the same env file) must still start.
        os.makedirs(directory, exist_ok=True)
    # The multi-process collector reads every process's files at each scrape; without the
    # directory (the Flask CLI, tests in one process) this process's registry is the truth.
    local = MultiProcessCollector(None, path=directory) if directory else REGISTRY
    app.extensions["metrics_scrape"] = _Scrape(local, RedisCollector(settings))
    app.before_request(_start)
    app.after_request(_observe)
    app.register_blueprint(bp)
