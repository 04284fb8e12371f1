"""kombu's Redis transports, with one failure of theirs during a reconnect made a connection error.

When the broker connection drops (Redis restarted, a Sentinel failover), Celery's consumer
closes the connection and opens a new one. Work from the old connection still reaches its
channel afterwards: the close puts the messages the worker holds back on the queue
(`restore_unacked_once`), and a task that ends later acknowledges or rejects its message on the
channel it came from. kombu 5.7's Redis channel then builds a connection pool from a connection
it no longer has, an AttributeError, which Celery counts as neither a connection nor a channel
error: the worker exits with "Unrecoverable error" instead of reconnecting (seen in
tests/e2e/faults/test_failover.py and the Redis restart test).

Here such a channel raises redis-py's ConnectionError instead, which kombu and Celery already
handle as a lost connection: the close goes on, the late ack or reject is logged and dropped.
Nothing is lost by that: the messages stay in kombu's `unacked` hash in Redis, and a worker's
periodic sweep (`restore_visible`, every BROKER_RESTORE_INTERVAL_SECONDS) puts them back on the
queue after BROKER_VISIBILITY_TIMEOUT; a task that then runs twice meets its delivered mark.

Only kombu's redis, rediss and sentinel schemes are pointed at these classes, under kombu's own
names, so every URL kombu parses (its failover list included) gets them.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES, _transport_cache
from kombu.transport import redis as kombu_redis


def _check_open(channel: kombu_redis.Channel) -> None:
    transport = channel.connection
    if transport is None or transport.client is None:
        raise redis.ConnectionError("this broker channel's connection is closed")


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        _check_open(self)
        params: dict[str, Any] = super()._connparams(asynchronous)
        return params


class SentinelChannel(kombu_redis.SentinelChannel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        _check_open(self)
        params: dict[str, Any] = super()._connparams(asynchronous)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


_ALIASES = {
    "redis": f"{__name__}:Transport",
    "rediss": f"{__name__}:Transport",
    "sentinel": f"{__name__}:SentinelTransport",
}


def install() -> None:
    """Make kombu's redis://, rediss:// and sentinel:// URLs use the classes above (idempotent)."""
    for scheme, path in _ALIASES.items():
        if TRANSPORT_ALIASES.get(scheme) != path:
            TRANSPORT_ALIASES[scheme] = path
            _transport_cache.pop(scheme, None)
