"""Helpers for tests that run the real processes: stub, web and worker, all on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("FIREHOSE_SAMPLES_DIR", ROOT.parent / "shared" / "firehose-samples"))
PYTHON = sys.executable
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

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
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


class Stub:
    """The partner stub as the tests see it: its URL and its admin routes."""

    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self) -> None:
        requests.post(f"{self.url}/_stub/reset", timeout=5).raise_for_status()

    def faults(self, rules: list[dict[str, Any]]) -> None:
        requests.post(f"{self.url}/_stub/faults", json={"rules": rules}, timeout=5).raise_for_status()

    def state(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/_stub/state", timeout=5).json()

    def requests(self, path_prefix: str = "/v1") -> list[dict[str, Any]]:
        return requests.get(f"{self.url}/_stub/requests", params={"path_prefix": path_prefix}, timeout=5).json()[
            "requests"
        ]


def sample(version: str, name: str) -> bytes:
    return (SAMPLES / version / name).read_bytes()
