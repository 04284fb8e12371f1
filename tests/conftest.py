"""Fixtures with real parts: the suite's own Redis, the partner stub, gunicorn and Celery workers.

The Redis is a private redis-server started for the run (tests/support/redis.py), so the suite
needs nothing running beforehand and never empties anyone else's databases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from devtools.procs import start_web, start_worker
from tests.support import DATABASES, MAIN_DB, Proc, Stub, base_env, own_stub, redis_db
from tests.support import redis as suite_redis

_REDIS_LINE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # Before collection: some test modules build URLs of the suite's Redis at import time.
    try:
        line = suite_redis.start()
    except RuntimeError as exc:  # no redis-server binary: say what to install, not a traceback
        raise pytest.UsageError(str(exc)) from None
    for db in DATABASES:
        suite_redis.flush(db)
    config.stash[_REDIS_LINE] = line


def pytest_sessionstart(session: pytest.Session) -> None:
    # Said even under -q: which Redis the run uses is worth one line.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(session.config.stash.get(_REDIS_LINE, ""))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The fast tier first: a broken unit shows in seconds, before minutes of real processes.
    unit = Path(__file__).parent / "unit"
    items.sort(key=lambda item: unit not in item.path.parents)


def pytest_unconfigure(config: pytest.Config) -> None:
    suite_redis.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return redis_db(MAIN_DB)


@pytest.fixture
def redis_client(redis_url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def stub(logs_dir: Path) -> Iterator[Stub]:
    with own_stub(logs_dir) as client:
        yield client


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
