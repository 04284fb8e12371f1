"""The suite's Redis: a private redis-server started for the run, on a free loopback port.

Set TEST_REDIS_URL (for example redis://127.0.0.1:6379) to use a Redis of your own instead:
the suite then empties the databases listed in tests/support/__init__.py (DATABASES) there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import redis

from devtools.redis_server import RedisServer

ENV = "TEST_REDIS_URL"

_server: RedisServer | None = None
_base: str | None = None


def start(logs_dir: Path | None = None) -> str:
    """Start the private server (or take TEST_REDIS_URL); returns a line saying which it is."""
    global _server, _base
    given = os.environ.get(ENV, "").strip()
    if given:
        # A database number in the URL is ignored: the suite picks its databases itself.
        scheme, _, rest = given.partition("://")
        host = rest.split("/", 1)[0]
        _base = f"{scheme}://{host}"
        return f"tests use the Redis at {_base} ({ENV}); databases emptied: see tests/support DATABASES"
    data_dir = Path(tempfile.mkdtemp(prefix="firehose-test-redis-"))
    _server = RedisServer(data_dir, logs_dir or data_dir, name="test-redis")
    _server.start()
    _base = _server.base_url()
    return f"tests use a private redis-server at {_base} (set {ENV} to use another)"


def stop() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None


def base_url() -> str:
    if _base is None:
        raise RuntimeError("the suite's Redis is not started (tests/conftest.py starts it)")
    return _base


def flush(db: int) -> None:
    client = redis.Redis.from_url(f"{base_url()}/{db}")
    try:
        client.flushdb()
    finally:
        client.close()
