"""Delivery counters kept in Redis, so every worker on every host adds to the same numbers
and the web's /metrics can report them without a scrape target per worker.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from marshmallow import Schema, fields

# The schemas register their classes as they load: skip_reason's field paths are theirs.
import schemas.audiences
import schemas.dsr
import schemas.events  # noqa: F401
from common.keys import Keys
from schemas.fields import LenientSchema
from schemas.messages import REQUEST_TYPES

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


# ----------------------------------------------------------------- delivery lag

# Acceptance -> partner 2xx, in seconds: from a healthy pipeline's fraction of a second up to
# RETRY_MAX_AGE_SECONDS (24 h), past which a message is dead-lettered instead.
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


def delivery_lag_key(keys: Keys) -> str:
    """Hash: a histogram of delivery lag per message type, fields `<type>|le_<bound>`, `|sum`, `|count`."""
    return f"{keys.prefix}:stats:delivery_lag"


def record_delivered(
    client: redis.Redis, keys: Keys, message_types: Iterable[str | None], first_seen_ms: int, now_ms: int
) -> None:
    """Counts delivered messages and adds their acceptance -> 2xx lag, in one round trip.

    Members of one task share its first_seen_ms (a group's is its oldest member's), so a group
    adds one lag per member, an upper bound for the younger ones.
    """
    by_type = Counter(message_label(kind) for kind in message_types)
    if not by_type:
        return
    seconds = max(0.0, (now_ms - first_seen_ms) / 1000)
    key = delivery_lag_key(keys)
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(keys.stats, DELIVERED, sum(by_type.values()))
    for kind, n in by_type.items():
        for bound in LAG_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(key, f"{kind}|{bucket_field(bound)}", n)
        pipe.hincrbyfloat(key, f"{kind}|sum", seconds * n)
        pipe.hincrby(key, f"{kind}|count", n)
    pipe.execute()


# ----------------------------------------------------------------- bounded label values

# Every label value /metrics exports comes from a fixed set written in code; whatever else a
# message brings (a DSR's subject_request_type, a field name inside a settings map) is counted
# as OTHER. One message must not be able to add a series, or a byte per series name, to a scrape.
OTHER = "other"
MESSAGE_TYPES = REQUEST_TYPES
# OpenDSR's subject_request_type values, as "unsupported_dsr_type:<type>" (only erasure is sent).
DSR_TYPES = frozenset({"access", "portability", "erasure", "rectification", "restriction", "objection"})
_FIXED_REASONS = frozenset(
    {
        "unknown_type",
        "unknown_action",
        "notification:invalid",
        "notification:unknown_type",
        "unparseable:submitted_time",
        "dsr_identity_encoding_mismatch",
        "unserialisable",
    }
)
_INVALID_PREFIXES = ("notification:invalid:", "invalid:")
_COUNTER_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def message_label(kind: Any) -> str:
    return kind if isinstance(kind, str) and kind in MESSAGE_TYPES else OTHER


def counter_label(name: str) -> str:
    """A worker counter's name as a label: counters are named in code, so anything else is OTHER."""
    return name if _COUNTER_NAME.fullmatch(name) else OTHER


def skip_reason(reason: str) -> str:
    """A skipped-event reason from the fixed set: the reasons the schemas write, with a field
    path cut to the longest path the schemas declare ("invalid:custom_attributes" for an entry
    of that map), an OpenDSR type or "other" after "unsupported_dsr_type:", else OTHER."""
    if reason in _FIXED_REASONS:
        return reason
    if reason.startswith("unsupported_dsr_type:"):
        kind = reason[len("unsupported_dsr_type:") :]
        return f"unsupported_dsr_type:{kind if kind in DSR_TYPES else OTHER}"
    for prefix in _INVALID_PREFIXES:
        if reason.startswith(prefix):
            names = reason[len(prefix) :].split(".")[:_MAX_PATH]
            paths = schema_paths()
            while names and ".".join(names) not in paths:
                names.pop()
            return prefix + (".".join(names) if names else OTHER)
    return OTHER


_MAX_PATH = 6


@functools.cache
def schema_paths() -> frozenset[str]:
    """Every field path the message schemas declare (`products.position`), errors' keys as
    marshmallow writes them (data_key first), plus the parts the schemas check by hand."""
    paths = {"event", "type", "notification", "identity", "profile", "audience", "user_attribute"}

    def walk(schema: Schema, prefix: str, depth: int) -> None:
        if depth > _MAX_PATH:
            return
        for name, field in schema.fields.items():
            path = f"{prefix}{field.data_key or name}"
            paths.add(path)
            nested = next((f for f in (field, getattr(field, "inner", None)) if isinstance(f, fields.Nested)), None)
            if nested is not None:
                walk(nested.schema, f"{path}.", depth + 1)

    for schema in _schema_classes(LenientSchema):
        walk(schema(), "", 0)
    # Checked before the schemas run (schemas/events.py _without_bad_entries).
    paths.add("runtime_environment.identities")
    return frozenset(paths)


def _schema_classes(base: type[Schema]) -> Iterator[type[Schema]]:
    for sub in base.__subclasses__():
        yield sub
        yield from _schema_classes(sub)
