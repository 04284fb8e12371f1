"""The suite's Redis: a private redis-server started for the run, on a free loopback port.

Set TEST_REDIS_URL (for example redis://127.0.0.1:6379) to use a Redis of your own instead:
the suite then empties the databases listed in tests/support/__init__.py (DATABASES) there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import redis
from redis.sentinel import Sentinel

from devtools.procs import wait_for
from devtools.redis_server import RedisServer, SentinelServer

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


class ReplicatedRedis:
    """A primary, its replicas and three Sentinels on loopback, for failover tests.

    Sentinel timings are a test's (a primary judged down after `down_after_ms`), so a failover
    takes seconds. Clients find the primary as the relay does: by asking the Sentinels.
    """

    MASTER = "relay"

    def __init__(self, root: Path, logs_dir: Path, replicas: int = 2, down_after_ms: int = 1000) -> None:
        self.primary = RedisServer(_dir(root, "primary"), logs_dir, name="failover-primary")
        self.replicas = [
            RedisServer(_dir(root, f"replica{i}"), logs_dir, name=f"failover-replica{i}", replica_of=self.primary)
            for i in range(1, replicas + 1)
        ]
        self.sentinels = [
            SentinelServer(
                _dir(root, f"sentinel{i}"),
                logs_dir,
                self.primary,
                name=f"failover-sentinel{i}",
                master_name=self.MASTER,
                down_after_ms=down_after_ms,
            )
            for i in range(1, 4)
        ]

    @property
    def addresses(self) -> str:
        """REDIS_SENTINELS for this set."""
        return ",".join(s.address for s in self.sentinels)

    def start(self) -> None:
        self.primary.start()
        for replica in self.replicas:
            replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        wait_for(self.settled, 60, 0.2, "the replicas in sync and every Sentinel aware of the others")

    def settled(self) -> bool:
        """Every replica linked to the primary, and every Sentinel sees them all and its two peers."""
        for replica in self.replicas:
            client = redis.Redis(port=replica.port, socket_timeout=1)
            try:
                if client.info("replication").get("master_link_status") != "up":
                    return False
            finally:
                client.close()
        for sentinel in self.sentinels:
            state = sentinel.master_state()
            if state.get("num-other-sentinels") != len(self.sentinels) - 1:
                return False
            if state.get("num-slaves") != len(self.replicas):
                return False
        return True

    def primary_port(self) -> int | None:
        """The primary's port as the Sentinels' majority says now; None while they disagree or it is down."""
        ports = []
        for sentinel in self.sentinels:
            try:
                state = sentinel.master_state()
            except redis.RedisError:
                continue
            flags = str(state.get("flags", ""))
            if "s_down" in flags or "o_down" in flags or "failover" in flags:
                return None
            ports.append(int(state["port"]))  # type: ignore[call-overload]
        return ports[0] if len(ports) == len(self.sentinels) and len(set(ports)) == 1 else None

    def client(self, db: int = 0) -> redis.Redis:
        """A client of whichever server is primary now (redis-py's Sentinel support)."""
        sentinel = Sentinel([("127.0.0.1", s.port) for s in self.sentinels], socket_timeout=2)
        return sentinel.master_for(self.MASTER, db=db, socket_timeout=5, socket_connect_timeout=2)

    def stop(self) -> None:
        for server in [*self.sentinels, *self.replicas, self.primary]:
            server.stop()


def _dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path
