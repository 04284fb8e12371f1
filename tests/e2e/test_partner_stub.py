"""The partner stub (devtools/partner_stub), the relay's default partner, as a process: a
subprocess on loopback, spoken to over HTTP, as the other end-to-end tests run it. Its startup
line, its log, faults from the environment, SIGTERM and a bad fault file. (The stub's logic,
through Flask's test client: tests/unit/test_partner_stub.py.)
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devtools.partner_stub import api_key_sha256
from tests.support import ROOT
from tests.support.partner_api import API_KEY, eid, events_body, headers

STARTUP_DEADLINE_S = 15.0
HTTP_TIMEOUT_S = 5.0


# --- running the stub as a subprocess --------------------------------------------


class RunningStub:
    def __init__(self, proc: subprocess.Popen[str], base_url: str, stderr_path: Path) -> None:
        self.proc = proc
        self.base_url = base_url
        self.stderr_path = stderr_path

    def url(self, path: str) -> str:
        return self.base_url + path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(timeout=5)
        return self.proc.returncode


def start_stub(tmp_dir: Path, extra_env: dict[str, str] | None = None) -> RunningStub:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUB_")}
    env.update(extra_env or {})
    env["PYTHONUNBUFFERED"] = "1"
    stderr_path = tmp_dir / f"stub-{uuid.uuid4().hex[:8]}.stderr"
    # stderr goes to a file: an unread pipe would fill up and block the stub.
    with open(stderr_path, "wb") as stderr_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devtools.partner_stub",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
    # readline() has no timeout, so read on a thread and bound the wait here.
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP_DEADLINE_S)
    except queue.Empty:
        proc.kill()
        proc.wait(timeout=5)
        pytest.fail(f"stub did not start in {STARTUP_DEADLINE_S}s: {stderr_path.read_text()}")
    prefix = "partner stub listening on "
    if not line.startswith(prefix):
        proc.kill()
        proc.wait(timeout=5)
        pytest.fail(f"unexpected first line {line!r}; stderr: {stderr_path.read_text()}")
    base_url = line[len(prefix) :].strip()
    assert not base_url.endswith(":0"), "the stub must print the bound port, not 0"
    return RunningStub(proc, base_url, stderr_path)


# Named `partner`, not `stub`: tests/conftest.py has a session `stub` for the
# end-to-end tests, and this module wants a stub of its own it can reset freely.
@pytest.fixture(scope="module")
def partner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStub]:
    running = start_stub(tmp_path_factory.mktemp("partner_stub"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def _fresh_stub(request: pytest.FixtureRequest) -> None:
    # Only the subprocess tests share a stub; each starts from a clean one.
    if "partner" in request.fixturenames:
        running: RunningStub = request.getfixturevalue("partner")
        requests.post(running.url("/_stub/reset"), timeout=HTTP_TIMEOUT_S).raise_for_status()


def get_json(partner: RunningStub, path: str) -> Any:
    response = requests.get(partner.url(path), timeout=HTTP_TIMEOUT_S)
    response.raise_for_status()
    return response.json()


# --- subprocess tests ------------------------------------------------------------


def test_request_log_and_stderr_never_show_the_api_key(partner: RunningStub) -> None:
    requests.post(
        partner.url("/v1/events"),
        json=events_body("ev-s"),
        headers=headers(),
        timeout=HTTP_TIMEOUT_S,
    ).raise_for_status()
    raw = requests.get(partner.url("/_stub/requests"), timeout=HTTP_TIMEOUT_S).text
    assert API_KEY not in raw
    assert api_key_sha256(API_KEY) in raw
    assert API_KEY not in partner.stderr_path.read_text()
    assert eid("ev-s") not in partner.stderr_path.read_text()  # no bodies in logs either


def test_faults_from_env_and_clean_sigterm(tmp_path: Path) -> None:
    faults = {"rules": [{"path_prefix": "/v1/users", "status": 500, "times": 1}]}
    running = start_stub(tmp_path, {"STUB_FAULTS": json.dumps(faults)})
    try:
        assert get_json(running, "/_stub/faults")["rules"][0]["status"] == 500
        body = {"account_id": 1, "request_id": "r", "regulation": "gdpr", "identities": []}
        first = requests.delete(
            running.url("/v1/users"),
            json=body,
            headers=headers(),
            timeout=HTTP_TIMEOUT_S,
        )
        second = requests.delete(
            running.url("/v1/users"),
            json=body,
            headers=headers(),
            timeout=HTTP_TIMEOUT_S,
        )
        assert (first.status_code, second.status_code) == (500, 202)
    finally:
        returncode = running.stop()
    assert returncode == 128 + signal.SIGTERM


def test_bad_fault_file_fails_startup(tmp_path: Path) -> None:
    faults_file = tmp_path / "faults.json"
    faults_file.write_text(json.dumps({"rules": [{"status": 503, "retry-after": "1"}]}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools.partner_stub",
            "--port",
            "0",
            "--faults",
            str(faults_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=STARTUP_DEADLINE_S,
        check=False,
    )
    assert proc.returncode == 2
    assert "retry-after" in proc.stderr
    assert proc.stdout == ""
