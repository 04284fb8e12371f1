"""Redis clients with timeouts that suit each side, for one Redis or a Sentinel-managed primary.

With REDIS_SENTINELS set, every client (web, workers, Celery's broker, Flower, the CLIs) asks
the Sentinels for the primary of REDIS_SENTINEL_MASTER whenever it opens a connection, so after
a failover a new connection reaches the new primary. REDIS_URL (and CELERY_BROKER_URL) then
give only the database number, the credentials and TLS; their host is not used. Without
Sentinels a URL is used as it is (a single Redis, or a managed endpoint whose DNS follows the
primary, as ElastiCache's and Heroku's do).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ReadOnlyError
from redis.retry import Retry
from redis.sentinel import Sentinel

if TYPE_CHECKING:
    from common.config import Settings

# A primary demoted to a replica keeps its connections open and refuses writes with READONLY.
# Retried (redis-py closes the connection first), a write reconnects: to the primary Sentinel
# names now, or through a managed endpoint's DNS to the new primary. Safe: the refused write
# was not applied.
_READ_ONLY = [ReadOnlyError]

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
        # With no retry left, redis-py still closes the connection: the next request reconnects.
        retry_on_error=_READ_ONLY,
        health_check_interval=0,
        **tls_options(url, ssl_cert_reqs),
    )


def worker_client(url: str, timeout_s: float = 5.0, ssl_cert_reqs: str | None = None) -> redis.Redis:
    """A client for workers and tools, where a short retry is cheaper than a failed task."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=_worker_retry(),
        retry_on_error=_READ_ONLY,
        health_check_interval=30,
        **tls_options(url, ssl_cert_reqs),
    )


def _worker_retry() -> Retry:
    # redis-py's own default (10 tries, 10 ms doubling to 1 s, jitter): a few seconds, about
    # what a Sentinel failover takes; past it the task gives its message back (workers/tasks.py).
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=1), 10)


# ------------------------------------------------------------------ from the Settings


def ingest_redis(settings: Settings, timeout_ms: int, url: str | None = None) -> redis.Redis:
    """The request path's client (see ingest_client), through Sentinel when REDIS_SENTINELS is set.

    `url` is REDIS_URL unless given (the broker's, for /metrics). Under Sentinel, asking for the
    primary is part of opening a connection and gets the same budget and no retry: a connection
    is opened once per pooled connection, and again only after a failure.
    """
    url = url or settings.redis_url
    if not settings.redis_sentinels:
        return ingest_client(url, timeout_ms, settings.redis_ssl_cert_reqs)
    timeout = timeout_ms / 1000.0
    return _sentinel_client(
        settings,
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def worker_redis(settings: Settings, timeout_s: float = 5.0, url: str | None = None) -> redis.Redis:
    """The workers' and tools' client (see worker_client), through Sentinel when REDIS_SENTINELS is set."""
    url = url or settings.redis_url
    if not settings.redis_sentinels:
        return worker_client(url, timeout_s, settings.redis_ssl_cert_reqs)
    return _sentinel_client(
        settings,
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=_worker_retry(),
        health_check_interval=30,
    )


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """REDIS_SENTINELS as (host, port) pairs (the setting's validator checked the form)."""
    pairs = []
    for item in settings.redis_sentinels:
        host, _, port = item.rpartition(":")
        pairs.append((host.strip("[]"), int(port)))
    return pairs


def _url_parts(url: str) -> dict[str, Any]:
    """What a redis:// or rediss:// URL says beside its host: database number and credentials."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    query = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
    db = path or query.get("db") or "0"
    return {
        "db": int(db),
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }


def _sentinel_kwargs(settings: Settings, url: str, **socket: Any) -> dict[str, Any]:
    """How to talk to the Sentinels themselves: their own password, and TLS when the URL has it."""
    kwargs: dict[str, Any] = dict(socket)
    if settings.redis_sentinel_password:
        kwargs["password"] = settings.redis_sentinel_password
    tls = tls_options(url, settings.redis_ssl_cert_reqs)
    if tls:
        kwargs.update(ssl=True, **tls)
    return kwargs


def _sentinel_client(settings: Settings, url: str, **options: Any) -> redis.Redis:
    socket = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout", "retry")}
    sentinel = Sentinel(sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings, url, **socket))
    tls = tls_options(url, settings.redis_ssl_cert_reqs)
    return sentinel.master_for(
        settings.redis_sentinel_master,
        **_url_parts(url),
        **options,
        **({"ssl": True, **tls} if tls else {}),
    )


def celery_broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it needs beside the project's own.

    Under Sentinel: kombu's sentinel:// transport, one URL per Sentinel joined by ';' (kombu's
    failover list), each carrying the database and the primary's credentials from the broker
    URL (kombu moves to the next URL with that URL's credentials), and `master_name`.
    Celery, `celery inspect conf` and Flower print the URL with its password masked.
    """
    if not settings.redis_sentinels:
        return settings.broker_url, {}
    parts = _url_parts(settings.broker_url)
    userinfo = ""
    if parts["username"] or parts["password"]:
        userinfo = f"{quote(parts['username'] or '', safe='')}:{quote(parts['password'] or '', safe='')}@"
    url = ";".join(
        f"sentinel://{userinfo}{_host(host)}:{port}/{parts['db']}" for host, port in sentinel_addresses(settings)
    )
    options: dict[str, Any] = {"master_name": settings.redis_sentinel_master}
    sentinel_kwargs = _sentinel_kwargs(settings, settings.broker_url)
    if sentinel_kwargs:
        # Without sentinel_kwargs redis-py would reuse the primary's socket options; with them
        # it takes only these, so the timeouts go in too.
        options["sentinel_kwargs"] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0, **sentinel_kwargs}
    return url, options


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
