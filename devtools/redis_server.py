"""A redis-server of our own on a free loopback port: for the test suite, the benchmark and the
fault tests that kill and restart Redis. Nothing of anyone else's Redis is touched or emptied."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import redis

from devtools.procs import Proc, free_port, wait_for


class RedisServer:
    """redis-server on 127.0.0.1:<free port>, its files in `data_dir`, its log in `logs_dir`.

    `durable` turns on append-only with fsync on every write, for tests that SIGKILL it and
    count what survived; otherwise it keeps nothing on disk.
    """

    def __init__(
        self,
        data_dir: Path,
        logs_dir: Path,
        name: str = "redis",
        durable: bool = False,
        replica_of: RedisServer | None = None,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.data_dir = data_dir
        self.logs_dir = logs_dir
        self.name = name
        self.durable = durable
        # A replica starts replicating from this server (a Sentinel may later promote it).
        self.replica_of = replica_of
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None
        self.starts = 0

    def base_url(self) -> str:
        """The server's URL without a database number."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        replication = ["--replicaof", "127.0.0.1", str(self.replica_of.port)] if self.replica_of else []
        args = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            *persistence,
            *replication,
            "--save",
            "",
            "--dir",
            str(self.data_dir),
            "--maxmemory-policy",
            "noeviction",
        ]
        self.proc = Proc(f"{self.name}-{self.starts}", args, dict(os.environ), self.logs_dir)
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)

        def ready() -> bool:
            if self.proc is not None and self.proc.popen.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{self.proc.output()[-2000:]}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(ready, 20, 0.05, "the private redis-server to answer")
        client.close()

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown; only what was fsynced survives."""
        assert self.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class SentinelServer:
    """redis-sentinel on 127.0.0.1:<free port>, watching `primary` under `master_name`.

    Its timings are the caller's: a test wants a failover within seconds, where production
    keeps Sentinel's defaults (30 s before a primary is judged down). Sentinel rewrites its
    configuration file as it learns, so each one gets its own under `data_dir`.
    """

    def __init__(
        self,
        data_dir: Path,
        logs_dir: Path,
        primary: RedisServer,
        name: str = "sentinel",
        master_name: str = "relay",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        if shutil.which("redis-sentinel") is None:
            raise RuntimeError("redis-sentinel is not installed (Debian: apt-get install redis-sentinel)")
        self.port = free_port()
        self.data_dir = data_dir
        self.logs_dir = logs_dir
        self.primary = primary
        self.name = name
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.data_dir / f"{self.name}.conf"
        config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    f"dir {self.data_dir}",
                    f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary.port} {self.quorum}",
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.master_name} 1",
                    "",
                ]
            )
        )
        self.proc = Proc(self.name, ["redis-sentinel", str(config)], dict(os.environ), self.logs_dir)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)

        def ready() -> bool:
            if self.proc is not None and self.proc.popen.poll() is not None:
                raise AssertionError(f"redis-sentinel exited:\n{self.proc.output()[-2000:]}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(ready, 20, 0.05, f"{self.name} to answer")
        client.close()

    def master_state(self) -> dict[str, object]:
        """What this Sentinel knows of the primary (SENTINEL MASTER <name>)."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            state: dict[str, object] = client.sentinel_master(self.master_name)
            return state
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
