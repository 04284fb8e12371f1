"""What a worker process holds on to: settings, a Redis client and the partner client.

Built lazily once per process, after the fork, so each pool process has its own
connection pools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import redis

from common.config import Settings
from common.keys import Keys
from common.redis_conn import worker_client
from workers.audiences import AudienceGuard
from workers.partner.base import PartnerClient
from workers.partner.reference import ReferencePartnerClient
from workers.ratelimit import PartnerGate, RateLimit
from workers.scheduler import RetrySchedule


@dataclass
class Runtime:
    settings: Settings
    keys: Keys
    redis: redis.Redis
    partner: PartnerClient
    gate: PartnerGate
    retries: RetrySchedule
    audiences: AudienceGuard


_runtime: Runtime | None = None
_pid: int | None = None


def build_runtime(settings: Settings, partner: PartnerClient | None = None) -> Runtime:
    keys = Keys(settings.key_prefix)
    client = worker_client(settings.redis_url)
    return Runtime(
        settings=settings,
        keys=keys,
        redis=client,
        partner=partner or ReferencePartnerClient(settings.partner_api_url, settings.partner_timeout_seconds),
        gate=PartnerGate(client, keys, RateLimit.parse(settings.partner_rate_limit), settings.rate_limit_margin_ms),
        retries=RetrySchedule(client, keys),
        # Held at most for one partner call (its timeout) plus a rate-limit wait.
        audiences=AudienceGuard(client, keys, lock_ttl_seconds=2 * settings.partner_timeout_seconds + 5),
    )


def runtime() -> Runtime:
    global _runtime, _pid
    if _runtime is None or _pid != os.getpid():
        _runtime = build_runtime(Settings.from_env())
        _pid = os.getpid()
    return _runtime
