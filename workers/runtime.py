"""What a worker process holds on to: settings, a Redis client and the partner client.

One Runtime per Flask app and per process: `runtime()` builds the current app's lazily, after
the fork, so each pool process has its own connection pools, and keeps it in the app's
extensions rather than in a module global.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any

import redis
from flask import current_app

from common.config import Settings
from common.keys import Keys
from common.redis_conn import worker_redis
from workers.audiences import AudienceGuard
from workers.gate import LEASE_MARGIN_SECONDS, PartnerGate
from workers.partner.base import PartnerClient
from workers.scheduler import RetrySchedule

_EXTENSION = "firehose_runtime"
# Two threads of one process (Celery's threads pool) asking at once build one runtime, not two.
_build_lock = threading.Lock()


@dataclass
class Runtime:
    settings: Settings
    keys: Keys
    redis: redis.Redis
    partner: PartnerClient
    gate: PartnerGate
    retries: RetrySchedule
    audiences: AudienceGuard


class PartnerClientError(Exception):
    """PARTNER_CLIENT does not name a usable partner client class."""


def partner_client_class(spec: str) -> Any:
    """The class `spec` ("package.module:Class") names; PartnerClientError says what is wrong."""
    module_name, _, class_name = spec.strip().partition(":")
    if not module_name or not class_name:
        raise PartnerClientError(f"PARTNER_CLIENT must look like 'package.module:Class', not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PartnerClientError(f"PARTNER_CLIENT {spec!r}: cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise PartnerClientError(f"PARTNER_CLIENT {spec!r}: {module_name!r} has no {class_name!r}")
    if not callable(getattr(cls, "from_settings", None)) or not callable(getattr(cls, "send", None)):
        raise PartnerClientError(
            f"PARTNER_CLIENT {spec!r}: {class_name} needs a from_settings(settings) classmethod "
            "and a send(operation, idempotency_key) method"
        )
    return cls


def load_partner_client(settings: Settings) -> PartnerClient:
    """The partner client PARTNER_CLIENT names, built by `Class.from_settings(settings)`."""
    client: PartnerClient = partner_client_class(settings.partner_client).from_settings(settings)
    return client


def build_runtime(settings: Settings, partner: PartnerClient | None = None) -> Runtime:
    """A Runtime for `settings`; the partner client is `partner`, else the one PARTNER_CLIENT names."""
    keys = Keys(settings.key_prefix)
    client = worker_redis(settings)
    return Runtime(
        settings=settings,
        keys=keys,
        redis=client,
        partner=partner or load_partner_client(settings),
        gate=PartnerGate.from_settings(client, keys, settings),
        retries=RetrySchedule(client, keys),
        # Held for one partner call at most (nothing waits under it any more), like a claim.
        audiences=AudienceGuard(client, keys, lock_ttl_seconds=settings.partner_timeout_seconds + LEASE_MARGIN_SECONDS),
    )


def runtime() -> Runtime:
    """The current Flask app's Runtime (tasks run in its context), built once per process."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    pid = os.getpid()
    held: tuple[int, Runtime] | None = app.extensions.get(_EXTENSION)
    if held is None or held[0] != pid:
        with _build_lock:
            held = app.extensions.get(_EXTENSION)
            # Keyed by pid: a runtime inherited across a fork would share the parent's sockets.
            if held is None or held[0] != pid:
                held = app.extensions[_EXTENSION] = (pid, build_runtime(app.config["SETTINGS"]))
    return held[1]
