"""Delivery counters kept in Redis, so every worker on every host adds to the same numbers
and the web's /metrics can report them without a scrape target per worker.
"""

from __future__ import annotations

import redis

from common.keys import Keys

# Counter names in the fr:stats:delivery hash.
DELIVERED = "delivered"  # messages whose every partner call was answered 2xx
RETRIED = "retried"  # attempts that failed transiently and were scheduled again
DEAD_LETTERED = "dead_lettered"  # messages moved to the dead letters
RATE_LIMITED = "rate_limited_waits"  # partner calls that waited for the rate limit or a Retry-After pause
PARTNER_CALLS = "partner_calls"  # partner calls made, whatever the answer
BREAKER_OPENED = "breaker_opened"  # times an API key's circuit breaker opened (or reopened)

# An open breaker no call has come for in this long is forgotten (its key expires, and it leaves
# the set of open breakers): a customer who stopped sending is not counted open for ever.
BREAKER_FORGET_MS = 3_600_000

# Upper bounds (seconds) of the partner-latency histogram buckets, Prometheus style.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def bucket_field(bound: float) -> str:
    return f"le_{bound:g}"


def record_latency(client: redis.Redis | redis.client.Pipeline, keys: Keys, seconds: float) -> None:
    """Adds one observation: cumulative buckets like Prometheus, plus sum and count."""
    pipe = client.pipeline(transaction=False) if isinstance(client, redis.Redis) else client
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            pipe.hincrby(keys.partner_latency, bucket_field(bound), 1)
    pipe.hincrbyfloat(keys.partner_latency, "sum", seconds)
    pipe.hincrby(keys.partner_latency, "count", 1)
    if isinstance(client, redis.Redis):
        pipe.execute()


def incr(client: redis.Redis | redis.client.Pipeline, keys: Keys, counter: str, amount: int = 1) -> None:
    client.hincrby(keys.stats, counter, amount)
