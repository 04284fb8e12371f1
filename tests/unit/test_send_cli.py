"""`flask firehose send`, through click's test runner, where no relay is needed: usage errors and
no relay listening. (Sending to a real gunicorn on loopback: tests/e2e/test_send_cli.py.)
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from flask import Flask

from tests.support.send_cli import cli_app, event_file, send


@pytest.fixture
def app(redis_url: str) -> Flask:
    return cli_app(redis_url)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_relay_listening_is_a_failure_not_a_hang(app: Flask, tmp_path: Path) -> None:
    path, _ = event_file(tmp_path, "batch.json")
    started = time.monotonic()
    result = send(app, str(path), "--url", f"http://127.0.0.1:{_closed_port()}/firehose", "--timeout", "2")
    assert result.exit_code == 1
    assert result.output == f"{path} - connection_error\n"
    assert time.monotonic() - started < 10


def test_a_folder_without_messages_is_a_usage_error(app: Flask, tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing to send")
    result = send(app, str(tmp_path))
    assert result.exit_code == 2
    assert "no *.json files" in result.output


def test_a_missing_file_is_a_usage_error(app: Flask, tmp_path: Path) -> None:
    assert send(app, str(tmp_path / "absent.json")).exit_code == 2
