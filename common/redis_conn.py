"""Redis clients built from a URL, with timeouts that suit each side."""

from __future__ import annotations

import ssl
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_CERT_MODES = {
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
}


def tls_options(url: str, default_cert_reqs: str | None = None) -> dict[str, object]:
    """TLS options for a rediss:// URL, for redis-py clients and Celery's broker_use_ssl alike.

    Heroku Redis serves a self-signed certificate on a bare rediss:// URL. The URL's own
    `?ssl_cert_reqs=none|optional|required` wins; without it `default_cert_reqs` applies: callers
    pass `settings.redis_ssl_cert_reqs` (REDIS_SSL_CERT_REQS). None, or an unknown value,
    verifies: failing safe.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return {}
    query = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
    reqs = query.get("ssl_cert_reqs", default_cert_reqs) or "required"
    return {"ssl_cert_reqs": _CERT_MODES.get(reqs.strip().lower(), ssl.CERT_REQUIRED)}


def ingest_client(url: str, timeout_ms: int, ssl_cert_reqs: str | None = None) -> redis.Redis:
    """A client for the request path: one attempt, bounded by the answer budget.

    redis-py retries three times by default; on the request path a retry would blow
    mParticle's 100 ms budget, and mParticle retries a 503 itself.
    """
    timeout = timeout_ms / 1000.0
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        **tls_options(url, ssl_cert_reqs),
    )


def worker_client(url: str, timeout_s: float = 5.0, ssl_cert_reqs: str | None = None) -> redis.Redis:
    """A client for workers and tools, where a short retry is cheaper than a failed task."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        **tls_options(url, ssl_cert_reqs),
    )
