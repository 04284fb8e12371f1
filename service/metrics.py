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

import base64
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
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
from common.redis_conn import ingest_redis
from schemas.messages import REQUEST_TYPES, RESPONSE_TYPES

# Process plumbing, not a setting: gunicorn.conf.py sets it for its workers at server start,
# and prometheus_client itself reads it from the environment.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Celery's queue is a Redis list named after it; tasks workers hold sit in kombu's "unacked" hash.
CELERY_QUEUE = DELIVERY_QUEUE
CELERY_UNACKED = "unacked"

# The age of the oldest message in every place one waits, read in the same round trip as the
# depths, on Redis's clock (the one that stamped the inbox ids). KEYS: inbox, lanes set, retry
# schedule, dead-letter index; ARGV: lane key prefix, retries looked at from each end, the
# dead-letter index's lowest live score (seconds: now minus DLQ_RETENTION_SECONDS).
# Returns {now ms, then the oldest acceptance time in ms of the inbox with the pump's lanes, the
# retry schedule and the dead letters (their dead_at), -1 where empty}. A stream's head is the
# entry that waited longest there; its first_seen field (retries, units), when present, is when
# the message was accepted. The retry schedule is ordered by due time, not age: its oldest
# message is near one end or the other (a long backoff at the far end, a hold at the near one),
# and only those ends are read, so a scrape stays cheap whatever its size.
AGES_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function older(a, b)
  if a == nil or (b ~= nil and b < a) then return b end
  return a
end
local function head_ms(key)
  local head = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
  if #head == 0 then return nil end
  local ms = tonumber(string.match(head[1][1], '^(%d+)'))
  local fields = head[1][2]
  for j = 1, #fields, 2 do
    if fields[j] == 'first_seen' then ms = tonumber(fields[j + 1]) or ms end
  end
  return ms
end
local inbox = head_ms(KEYS[1])
for _, lane in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  inbox = older(inbox, head_ms(ARGV[1] .. lane))
end
local retry = nil
local n = tonumber(ARGV[2])
for _, range in ipairs({{0, n - 1}, {-n, -1}}) do
  for _, member in ipairs(redis.call('ZRANGE', KEYS[3], range[1], range[2])) do
    -- first_seen is written before the body; a body's own quotes are escaped, so no false match.
    retry = older(retry, tonumber(string.match(member, '"first_seen":(%d+)')))
  end
end
local dead = nil
-- Letters older than the retention have expired: their index entries linger until the next
-- dead letter or `flask dlq` prunes them, and are not counted.
local first = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[3], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #first == 2 then dead = math.floor(tonumber(first[2]) * 1000) end
return {now, inbox or -1, retry or -1, dead or -1}
"""
RETRY_AGE_SAMPLE = 50

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
        self.retention_s = settings.dlq_retention_seconds
        self.watermark = settings.redis_memory_high_watermark
        # One attempt, bounded: a scrape that hangs on Redis would tie up a web worker.
        self.client = ingest_redis(settings, timeout_ms)
        same_server = settings.broker_url in ("", settings.redis_url)
        self.broker = None if same_server else ingest_redis(settings, timeout_ms, url=settings.broker_url)

    def describe(self) -> list[Metric]:
        # Nothing to declare up front; registering must not cost a Redis round trip.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("firehose_redis_up", "1 when the scrape could read Redis, else 0.")
        pipe = self.client.pipeline(transaction=False)
        # The backlog not yet handed to Celery: the inbox and the pump's per-key lanes.
        pipe.eval(BACKLOG_LUA, 2, self.keys.inbox, self.keys.lanes, self.keys.lane_prefix)
        pipe.zcard(self.keys.retry_schedule)
        # Only the letters still kept: expired ones leave their index entry behind for a while.
        live_since = time.time() - self.retention_s
        pipe.zcount(self.keys.dead_letter_index, live_since, "+inf")
        pipe.hgetall(self.keys.skipped_events)
        pipe.hgetall(self.keys.stats)
        pipe.hgetall(self.keys.partner_latency)
        # Not a series per API key: how many are open. Forgotten breakers (no call came for them
        # since) may linger in the set until the next opening prunes it; they are not counted.
        pipe.zcount(self.keys.breakers_open, time.time_ns() // 1_000_000 - stats.BREAKER_FORGET_MS, "+inf")
        keys = self.keys
        ages_keys = (keys.inbox, keys.lanes, keys.retry_schedule, keys.dead_letter_index)
        pipe.eval(AGES_LUA, 4, *ages_keys, keys.lane_prefix, RETRY_AGE_SAMPLE, live_since)
        pipe.hgetall(stats.delivery_lag_key(self.keys))
        if self.broker is None:
            pipe.llen(CELERY_QUEUE)
            pipe.hlen(CELERY_UNACKED)
            pipe.lindex(CELERY_QUEUE, -1)
        try:
            results = pipe.execute()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        backlog, retry, dead, skipped, counters, latency, breakers, ages, lag, *celery = results
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
        yield self._ages(ages, celery[2] if celery else None)
        yield self._lag(_decode(lag))
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
        # Written bounded (workers/delivery.py); bounded again here for what older code wrote.
        reasons: dict[str, int] = {}
        for reason, value in _decode(skipped).items():
            label = stats.skip_reason(reason)
            reasons[label] = reasons.get(label, 0) + _int(value)
        for reason, value in sorted(reasons.items()):
            skipped_family.add_metric([reason], value)
        yield skipped_family

        yield from self._worker_counters(_decode(counters))
        yield self._latency(_decode(latency))
        yield from self._memory(self.client, self.watermark)

    @staticmethod
    def _memory(client: redis.Redis, watermark: float) -> Iterable[Metric]:
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
        # The web's own test (service/ingest.py memory_high): while 1, new messages are answered 503.
        used, limit = _int(memory.get("used_memory", 0)), _int(memory.get("maxmemory", 0))
        yield GaugeMetricFamily(
            "firehose_redis_memory_high",
            "1 while Redis's used memory is at or above REDIS_MEMORY_HIGH_WATERMARK x maxmemory "
            "(new messages answered 503); 0 otherwise or without maxmemory.",
            int(bool(limit) and used >= watermark * limit),
        )

    @staticmethod
    def _broker_depths(broker: redis.Redis) -> list[int]:
        # A broker of its own (CELERY_BROKER_URL): its queues are left out when it does not answer.
        try:
            pipe = broker.pipeline(transaction=False)
            pipe.llen(CELERY_QUEUE)
            pipe.hlen(CELERY_UNACKED)
            pipe.lindex(CELERY_QUEUE, -1)
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
            named: dict[str, int] = {}
            for field in others:
                label = stats.counter_label(field)
                named[label] = named.get(label, 0) + _int(values[field])
            for label, value in sorted(named.items()):
                family.add_metric([label], value)
            yield family

    @staticmethod
    def _ages(ages: list[Any], celery_head: bytes | None) -> Metric:
        now_ms, *oldest = (_int(ms) for ms in ages)
        family = GaugeMetricFamily(
            "firehose_oldest_message_age_seconds",
            "Seconds since the oldest waiting message was accepted (0 when none waits), by where it waits: "
            "inbox (the inbox and the pump's lanes), celery (Celery's queue), retry (the retry schedule), "
            "dead_letters (since the oldest dead letter was stored).",
            labels=["queue"],
        )
        celery = _celery_first_seen(celery_head)
        for queue, ms in zip(("inbox", "retry", "dead_letters"), oldest, strict=True):
            family.add_metric([queue], max(0, now_ms - ms) / 1000 if ms >= 0 else 0)
        family.add_metric(["celery"], max(0, now_ms - celery) / 1000 if celery is not None else 0)
        return family

    @staticmethod
    def _lag(values: dict[str, bytes]) -> Metric:
        family = HistogramMetricFamily(
            "firehose_delivery_lag_seconds",
            "Seconds from a message's acceptance to the partner's 2xx for it, by message type, across every worker.",
            labels=["type"],
        )
        by_type: dict[str, dict[str, bytes]] = {}
        for field, value in values.items():
            kind, _, part = field.rpartition("|")
            by_type.setdefault(stats.message_label(kind), {})[part] = value
        for kind, parts in sorted(by_type.items()):
            buckets, total = _cumulative(parts, stats.LAG_BUCKETS)
            family.add_metric([kind], buckets, total)
        return family

    @staticmethod
    def _latency(values: dict[str, bytes]) -> Metric:
        buckets, total = _cumulative(values, stats.LATENCY_BUCKETS)
        return HistogramMetricFamily(
            "firehose_partner_latency_seconds",
            "Partner call latency, across every worker.",
            buckets=buckets,
            sum_value=total,
        )


def _cumulative(values: dict[str, Any], known: Iterable[float]) -> tuple[list[tuple[str, float]], float]:
    """(buckets, sum) of a histogram kept in a Redis hash (common/stats.py)."""
    bounds: dict[float, int] = {bound: 0 for bound in known}
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
    return buckets, float(total) if _is_number(total) else 0.0


def _celery_first_seen(raw: bytes | None) -> int | None:
    """first_seen_ms of the task at the head of Celery's queue (kombu pushes left, pops right):
    a kombu message whose base64 body is Celery's [args, kwargs, embed]. None if unreadable."""
    if not raw:
        return None
    try:
        message = orjson.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = orjson.loads(body)
        first_seen = kwargs.get("first_seen_ms")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return first_seen if isinstance(first_seen, int) and not isinstance(first_seen, bool) else None


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


def observe_request(message_type: Any, status: int, started: float | None) -> None:
    """One Firehose request answered: its count by type and status, its latency by type."""
    kind = type_label(message_type)
    _child(REQUESTS, kind, str(status)).inc()
    if started is not None:
        _child(REQUEST_LATENCY, kind).observe(time.perf_counter() - started)


def _observe(response: Response) -> Response:
    # Only the Firehose endpoint: scrapes and health checks would swamp its latency.
    if request.blueprint == "firehose":
        message_type = (g.get("message_fields") or {}).get("message_type")
        observe_request(message_type, response.status_code, g.get("metrics_started"))
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
