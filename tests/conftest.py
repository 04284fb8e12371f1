"""Fixtures with real parts: a real Redis, the partner stub, gunicorn and Celery workers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from tests.support import BIN, PYTHON, Proc, Stub, free_port, wait_for

# A database of its own on the machine's Redis, emptied at the start of the run.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


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
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def stub(logs_dir: Path) -> Iterator[Stub]:
    port = free_port()
    proc = Proc(
        "partner-stub",
        [PYTHON, "-m", "devtools.partner_stub", "--host", "127.0.0.1", "--port", str(port)],
        dict(os.environ),
        logs_dir,
    )
    try:
        proc.wait_output("partner stub listening", timeout=20)
        yield Stub(f"http://127.0.0.1:{port}")
    finally:
        proc.stop()


@pytest.fixture
def clean_stub(stub: Stub) -> Stub:
    stub.reset()
    return stub


def start_worker(name: str, env: dict[str, str], logs_dir: Path, concurrency: int = 2) -> Proc:
    proc = Proc(
        name,
        [
            str(BIN / "celery"),
            "-A",
            "workers.worker",
            "worker",
            "--loglevel",
            "INFO",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-mingle",
            "--without-gossip",
        ],
        env,
        logs_dir,
    )
    proc.wait_output("ready.", timeout=60)
    return proc


@pytest.fixture(scope="module")
def worker(redis_url: str, stub: Stub, logs_dir: Path) -> Iterator[Proc]:
    proc = start_worker("worker", base_env(redis_url, PARTNER_API_URL=stub.url), logs_dir)
    yield proc
    proc.stop()


def start_web(env: dict[str, str], logs_dir: Path, name: str = "web") -> tuple[Proc, str]:
    port = free_port()
    env = dict(env, PORT=str(port), WEB_CONCURRENCY="2")
    proc = Proc(name, [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "service:create_app()"], env, logs_dir)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        import requests

        if proc.popen.poll() is not None:
            raise AssertionError(f"web exited:\n{proc.output()[-3000:]}")
        try:
            return requests.get(f"{url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, 30, 0.1, "gunicorn to answer /healthz")
    return proc, url


@pytest.fixture(scope="module")
def web(redis_url: str, logs_dir: Path) -> Iterator[str]:
    proc, url = start_web(base_env(redis_url, FIREHOSE_AUTH_TOKEN="test-token"), logs_dir)
    yield url
    proc.stop()
