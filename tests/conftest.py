"""Fixtures with real parts: a real Redis, the partner stub, gunicorn and Celery workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from devtools.procs import start_stub, start_web, start_worker
from tests.support import Proc, Stub

# A database of its own on the machine's Redis, emptied at the start of the run.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


def redis_db(db: int) -> str:
    """Another database on the test Redis, for a stack of its own."""
    return REDIS_URL.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis_lib.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis_lib.RedisError as exc:
        pytest.exit(f"these tests need a Redis at {REDIS_URL}: {exc}", returncode=2)
    client.flushdb()
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREHOSE_", "PARTNER_", "RETRY_"))}
    env.update(
        {
            "REDIS_URL": redis_url,
            "PYTHONUNBUFFERED": "1",
            # Short waits through configuration, never a mocked clock.
            "RETRY_BACKOFF_BASE": "0.2",
            "RETRY_BACKOFF_MAX": "2",
            "PUMP_BLOCK_MS": "100",
            "PUMP_CLAIM_IDLE_MS": "3000",
            "BROKER_VISIBILITY_TIMEOUT": "30",
            "BROKER_RESTORE_INTERVAL_SECONDS": "2",
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def stub(logs_dir: Path) -> Iterator[Stub]:
    proc, client = start_stub(dict(os.environ), logs_dir)
    try:
        yield client
    finally:
        proc.stop()


@pytest.fixture
def clean_stub(stub: Stub) -> Stub:
    stub.reset()
    return stub


@pytest.fixture(scope="module")
def worker(redis_url: str, stub: Stub, logs_dir: Path) -> Iterator[Proc]:
    proc = start_worker("worker", base_env(redis_url, PARTNER_API_URL=stub.url), logs_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def web(redis_url: str, logs_dir: Path) -> Iterator[str]:
    proc, url = start_web(base_env(redis_url, FIREHOSE_AUTH_TOKEN="test-token"), logs_dir)
    yield url
    proc.stop()
