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

    def __init__(self, data_dir: Path, logs_dir: Path, name: str = "redis", durable: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.data_dir = data_dir
        self.logs_dir = logs_dir
        self.name = name
        self.durable = durable
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None
        self.starts = 0

    def base_url(self) -> str:
        """The server's URL without a database number."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        args = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            *persistence,
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
