"""Running the project's processes from tests and benchmarks: start, watch, wait, stop for sure."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from devtools.partner_stub.client import Stub

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll until predicate() is truthy; every wait in the suite is bounded by this."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last={last!r}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A child process with its output in a file, stopped for sure at the end."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()[-3000:]}")
            return text in self.output()

        wait_for(seen, timeout, 0.1, f"{self.name} to print {text!r}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


def start_worker(
    name: str, env: dict[str, str], logs_dir: Path, concurrency: int | None = None, pool: str | None = None
) -> Proc:
    """A Celery worker as the Procfile's line starts it: the pool and its size come from the
    settings (WORKER_POOL, WORKER_CONCURRENCY in `env`) unless `pool`/`concurrency` are given."""
    flags: list[str] = []
    if pool is not None:
        flags += ["--pool", pool]
    if concurrency is not None:
        flags += ["--concurrency", str(concurrency)]
    proc = Proc(
        name,
        [
            str(BIN / "celery"),
            "-A",
            "workers.worker",
            "worker",
            "--loglevel",
            "INFO",
            *flags,
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


def start_gunicorn(app: str, env: dict[str, str], logs_dir: Path, name: str, cwd: Path = ROOT) -> tuple[Proc, str]:
    """gunicorn -c gunicorn.conf.py APP on a free loopback port, once it answers /healthz; from
    another checkout of the project with `cwd` (its gunicorn.conf.py and its code)."""
    port = free_port()
    env = dict(env, PORT=str(port))
    args = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}", app]
    proc = Proc(name, args, env, logs_dir, cwd=cwd)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{name} exited:\n{proc.output()[-3000:]}")
        try:
            return requests.get(f"{url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, 30, 0.1, f"{name} to answer /healthz")
    return proc, url


def start_web(env: dict[str, str], logs_dir: Path, name: str = "web") -> tuple[Proc, str]:
    return start_gunicorn("service:create_app()", dict(env, WEB_CONCURRENCY="2"), logs_dir, name)


def start_stub(env: dict[str, str], logs_dir: Path, name: str = "partner-stub") -> tuple[Proc, Stub]:
    port = free_port()
    proc = Proc(
        name,
        [sys.executable, "-m", "devtools.partner_stub", "--host", "127.0.0.1", "--port", str(port)],
        env,
        logs_dir,
    )
    proc.wait_output("partner stub listening", timeout=20)
    return proc, Stub(f"http://127.0.0.1:{port}")


def procfile_argv(role: str, procfile: Path = ROOT / "Procfile") -> list[str]:
    """The Procfile's command line for `role`, its executable taken from this venv."""
    for raw in procfile.read_text().splitlines():
        name, _, command = raw.partition(":")
        if name.strip() == role and not raw.lstrip().startswith("#"):
            argv = shlex.split(command)
            local = BIN / argv[0]
            return [str(local) if local.exists() else argv[0], *argv[1:]]
    raise KeyError(f"no {role!r} line in {procfile}")


def start_procfile_worker(name: str, env: dict[str, str], logs_dir: Path) -> Proc:
    """A worker from the Procfile's own line, verbatim: no --hostname, so two started on one host
    share Celery's default node name, as two copies of one deploy would. Not waited for: call
    `wait_output("ready.")`, so that several can be started at the same moment."""
    return Proc(name, procfile_argv("worker"), env, logs_dir)
