"""Sentinel wiring (common/redis_conn.py, workers/celery_app.py) and the broker transport's guard.

What a failover does to these clients is proven end to end in tests/e2e/faults/test_failover.py;
here, what each builder hands redis-py and kombu, and the guard against the real suite Redis.
"""

from __future__ import annotations

import pytest
import redis
from kombu import Connection
from redis.sentinel import SentinelConnectionPool

from common.config import Settings
from common.redis_conn import celery_broker, ingest_redis, worker_redis
from tests.support import WORKER_CORE_DB
from tests.support.redis import base_url
from workers import broker_transport
from workers.celery_app import celery_config

SENTINELS = "10.0.0.1:26379,10.0.0.2:26380"


def sentinel_settings(**extra: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": "redis://:p%40ss@ignored:6379/4",
        "redis_sentinels": SENTINELS,
        "redis_sentinel_master": "relay",
    }
    values.update(extra)
    return Settings(**values)


def test_broker_without_sentinels_is_the_url_as_given() -> None:
    settings = Settings(redis_url="redis://h:6379/2")
    assert celery_broker(settings) == ("redis://h:6379/2", {})
    options = celery_config(settings)["broker_transport_options"]
    assert "master_name" not in options


def test_broker_through_sentinel_keeps_database_and_credentials_on_every_url() -> None:
    url, options = celery_broker(sentinel_settings(redis_sentinel_password="s3cret"))
    # kombu moves to the next URL of the list with that URL's own credentials.
    assert url == "sentinel://:p%40ss@10.0.0.1:26379/4;sentinel://:p%40ss@10.0.0.2:26380/4"
    assert options["master_name"] == "relay"
    assert options["sentinel_kwargs"]["password"] == "s3cret"
    config = celery_config(sentinel_settings())
    assert config["broker_url"].startswith("sentinel://")
    assert config["broker_transport_options"]["master_name"] == "relay"
    # The project's own options are still there beside Sentinel's.
    assert "visibility_timeout" in config["broker_transport_options"]
    assert config["broker_channel_error_retry"] is True


def test_clients_through_sentinel_ask_for_the_primary_by_name() -> None:
    settings = sentinel_settings()
    ingest = ingest_redis(settings, 60)
    worker = worker_redis(settings)
    for client in (ingest, worker):
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "relay" and pool.is_master
        assert pool.connection_kwargs["db"] == 4 and pool.connection_kwargs["password"] == "p@ss"
        addresses = [
            (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in pool.sentinel_manager.sentinels
        ]
        assert addresses == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    # The request path keeps one attempt within its budget, Sentinel's question included.
    assert ingest.connection_pool.connection_kwargs["retry"].get_retries() == 0
    assert ingest.connection_pool.connection_kwargs["socket_timeout"] == pytest.approx(0.06)
    for sentinel in ingest.connection_pool.sentinel_manager.sentinels:
        assert sentinel.connection_pool.connection_kwargs["retry"].get_retries() == 0
        assert sentinel.connection_pool.connection_kwargs["socket_timeout"] == pytest.approx(0.06)
    assert worker.connection_pool.connection_kwargs["retry"].get_retries() > 0


def test_a_broker_channel_whose_connection_closed_raises_a_connection_error() -> None:
    broker_transport.install()
    connection = Connection(f"{base_url()}/{WORKER_CORE_DB}")
    channel = connection.default_channel
    assert isinstance(channel, broker_transport.Channel)
    channel.client.ping()  # a working channel first
    connection.release()
    # What kombu 5.7 meets when a late ack, reject or restore reaches a channel of a closed
    # connection: an AttributeError that ends the worker. Now the error kombu and Celery handle.
    with pytest.raises(redis.ConnectionError):
        channel._connparams()
    assert isinstance(redis.ConnectionError(), connection.connection_errors)
