"""Settings from the environment, documented in .env.example."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


SSL_CERT_REQS = ("required", "optional", "none")


def redis_ssl_cert_reqs_from_env() -> str:
    """REDIS_SSL_CERT_REQS, checked: a typo must stop the process, not quietly change TLS."""
    value = _str("REDIS_SSL_CERT_REQS", "required").lower()
    if value not in SSL_CERT_REQS:
        raise ValueError(f"REDIS_SSL_CERT_REQS must be one of {', '.join(SSL_CERT_REQS)}, not {value!r}")
    return value


def _tokens(raw: str) -> tuple[str, ...]:
    # A comma-separated list lets an operator rotate the inbound token without downtime.
    return tuple(t.strip() for t in raw.split(",") if t.strip())


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Where Celery keeps its queues; defaults to REDIS_URL.
    broker_url: str = ""
    # Certificate check for rediss:// URLs that do not say (?ssl_cert_reqs=...): Heroku Redis
    # gives a bare rediss:// URL with a self-signed certificate, so it needs "none" from here.
    redis_ssl_cert_reqs: str = "required"
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    partner_api_url: str = "http://127.0.0.1:9400"
    max_body_bytes: int = 5 * 1024 * 1024
    dedup_ttl_seconds: int = 86400
    # Each read of a request body from the client; a stalled client gets 408, not a worker.
    body_read_timeout_seconds: float = 5.0
    # Requests without a valid token can only be registrations, which are small.
    unauthenticated_max_body_bytes: int = 64 * 1024
    # The whole Redis round trip of the request path must fit in mParticle's 100 ms budget.
    ingest_redis_timeout_ms: int = 60
    key_prefix: str = "fr"
    partner_timeout_seconds: float = 10.0
    retry_max_attempts: int = 8
    retry_backoff_base: float = 2.0
    retry_backoff_max: float = 600.0
    retry_max_age_seconds: int = 86400
    # A hostile or broken Retry-After must not park an API key for days.
    retry_after_max_seconds: float = 600.0
    # Tasks never wait in a worker (retries go to the retry schedule), so this only has to
    # outlast the longest delivery: a task held longer by a dead worker is handed to another.
    broker_visibility_timeout: int = 900
    # How often each worker looks for such tasks.
    broker_restore_interval_seconds: int = 10
    # Calls per period to the partner, per API key, across every worker: "50/second", "600/minute".
    partner_rate_limit: str = "50/second"
    # Added to the rate-limit period: a call decided at the edge of a window can reach the
    # partner a little later than another, and the partner counts by arrival.
    rate_limit_margin_ms: int = 50
    # A wait up to this long for the rate limit is slept in the worker; longer ones go to the
    # retry schedule, so no worker is parked for long.
    rate_limit_max_inline_wait_seconds: float = 1.0
    pump_batch_size: int = 200
    # Event batches for one API key share a partner call: at most this many messages and
    # events a call, and the pump waits this long for a batch to fill when traffic is light.
    delivery_batch_max_messages: int = 50
    delivery_batch_max_events: int = 1000
    delivery_batch_wait_ms: int = 20
    # Cookie sync: where /cookie-sync may send the browser back to, which macro in mParticle's
    # redirect URL takes the partner id, and the partner's first-party id cookie.
    cookie_sync_allowed_hosts: tuple[str, ...] = ("pixels.mparticle.com",)
    cookie_sync_macro: str = "%%partner_id%%"
    cookie_sync_cookie: str = "fr_uid"
    pump_block_ms: int = 500
    pump_claim_idle_ms: int = 30000

    @classmethod
    def from_env(cls) -> Settings:
        redis_url = _str("REDIS_URL", cls.redis_url)
        return cls(
            redis_url=redis_url,
            broker_url=_str("CELERY_BROKER_URL", redis_url),
            redis_ssl_cert_reqs=redis_ssl_cert_reqs_from_env(),
            auth_tokens=_tokens(os.environ.get("FIREHOSE_AUTH_TOKEN", "")),
            partner_api_url=_str("PARTNER_API_URL", cls.partner_api_url).rstrip("/"),
            max_body_bytes=_int("MAX_BODY_BYTES", cls.max_body_bytes),
            dedup_ttl_seconds=_int("DEDUP_TTL_SECONDS", cls.dedup_ttl_seconds),
            body_read_timeout_seconds=_float("BODY_READ_TIMEOUT_SECONDS", cls.body_read_timeout_seconds),
            unauthenticated_max_body_bytes=_int("UNAUTHENTICATED_MAX_BODY_BYTES", cls.unauthenticated_max_body_bytes),
            ingest_redis_timeout_ms=_int("INGEST_REDIS_TIMEOUT_MS", cls.ingest_redis_timeout_ms),
            key_prefix=_str("REDIS_KEY_PREFIX", cls.key_prefix),
            partner_timeout_seconds=_float("PARTNER_TIMEOUT_SECONDS", cls.partner_timeout_seconds),
            retry_max_attempts=_int("RETRY_MAX_ATTEMPTS", cls.retry_max_attempts),
            retry_backoff_base=_float("RETRY_BACKOFF_BASE", cls.retry_backoff_base),
            retry_backoff_max=_float("RETRY_BACKOFF_MAX", cls.retry_backoff_max),
            retry_max_age_seconds=_int("RETRY_MAX_AGE_SECONDS", cls.retry_max_age_seconds),
            retry_after_max_seconds=_float("RETRY_AFTER_MAX_SECONDS", cls.retry_after_max_seconds),
            partner_rate_limit=_str("PARTNER_RATE_LIMIT", cls.partner_rate_limit),
            rate_limit_margin_ms=_int("RATE_LIMIT_MARGIN_MS", cls.rate_limit_margin_ms),
            rate_limit_max_inline_wait_seconds=_float(
                "RATE_LIMIT_MAX_INLINE_WAIT_SECONDS", cls.rate_limit_max_inline_wait_seconds
            ),
            broker_visibility_timeout=_int("BROKER_VISIBILITY_TIMEOUT", cls.broker_visibility_timeout),
            broker_restore_interval_seconds=_int(
                "BROKER_RESTORE_INTERVAL_SECONDS", cls.broker_restore_interval_seconds
            ),
            pump_batch_size=_int("PUMP_BATCH_SIZE", cls.pump_batch_size),
            delivery_batch_max_messages=_int("DELIVERY_BATCH_MAX_MESSAGES", cls.delivery_batch_max_messages),
            delivery_batch_max_events=_int("DELIVERY_BATCH_MAX_EVENTS", cls.delivery_batch_max_events),
            delivery_batch_wait_ms=_int("DELIVERY_BATCH_WAIT_MS", cls.delivery_batch_wait_ms),
            cookie_sync_allowed_hosts=_tokens(os.environ.get("COOKIE_SYNC_ALLOWED_HOSTS", ""))
            or cls.cookie_sync_allowed_hosts,
            cookie_sync_macro=_str("COOKIE_SYNC_MACRO", cls.cookie_sync_macro),
            cookie_sync_cookie=_str("COOKIE_SYNC_COOKIE", cls.cookie_sync_cookie),
            pump_block_ms=_int("PUMP_BLOCK_MS", cls.pump_block_ms),
            pump_claim_idle_ms=_int("PUMP_CLAIM_IDLE_MS", cls.pump_claim_idle_ms),
        )

    def public(self) -> dict[str, object]:
        """The settings without secrets, for a startup log line."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        out["auth_tokens"] = len(self.auth_tokens)
        return out
