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
from workers.partner.base import PartnerClient
from workers.partner.reference import ReferencePartnerClient


@dataclass
class Runtime:
    settings: Settings
    keys: Keys
    redis: redis.Redis
    partner: PartnerClient


_runtime: Runtime | None = None
_pid: int | None = None


def build_runtime(settings: Settings) -> Runtime:
    return Runtime(
        settings=settings,
        keys=Keys(settings.key_prefix),
        redis=worker_client(settings.redis_url),
        partner=ReferencePartnerClient(settings.partner_api_url, settings.partner_timeout_seconds),
    )


def runtime() -> Runtime:
    global _runtime, _pid
    if _runtime is None or _pid != os.getpid():
        _runtime = build_runtime(Settings.from_env())
        _pid = os.getpid()
    return _runtime
