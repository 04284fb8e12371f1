"""`flask firehose send`, through click's test runner, where no relay is needed: usage errors and
no relay listening. (Sending to a real gunicorn on loopback: tests/e2e/test_send_cli.py.)
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from flask import Flask

from tests.support.loopback import Answer, ScriptedServer, serve
from tests.support.send_cli import TOKEN, cli_app, event_file, send


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


def test_each_answer_is_summed_up_and_any_non_2xx_fails(app: Flask, tmp_path: Path) -> None:
    # Against a scripted server on loopback: the answers a real relay rarely gives on demand.
    (tmp_path / "notes.txt").write_text("not a message")
    paths = [event_file(tmp_path, f"{i}.json")[0] for i in range(5)]
    server = ScriptedServer(
        Answer(202, {"type": "event_processing_response"}),
        Answer(400, {"error": {"code": "invalid_message", "message": "no"}}),
        Answer(502, "<html>bad gateway</html>"),
        Answer(200, [1, 2]),
        Answer(500, {"error": "flat"}),
    )
    with serve(server.app) as url:
        result = send(app, str(tmp_path), "--url", f"{url}/firehose")
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{paths[0]} 202 event_processing_response",
        f"{paths[1]} 400 invalid_message",
        f"{paths[2]} 502 non_json_answer",
        f"{paths[3]} 200 -",
        f"{paths[4]} 500 -",
    ]
    # Bytes as on disk, with the first configured token.
    assert [r.body for r in server.received] == [p.read_bytes() for p in paths]
    assert {r.headers["Authorization"] for r in server.received} == {f"Token {TOKEN}"}
    assert {(r.method, r.path) for r in server.received} == {("POST", "/firehose")}


def test_all_2xx_exits_0_and_an_empty_token_sends_none(app: Flask, tmp_path: Path) -> None:
    path, _ = event_file(tmp_path, "one.json")
    server = ScriptedServer(default=Answer(202, {"type": "event_processing_response"}))
    with serve(server.app) as url:
        unauthenticated = send(app, str(path), "--url", url, "--token", "")
        chosen = send(app, str(path), "--url", url, "--token", "mine")
    assert (unauthenticated.exit_code, chosen.exit_code) == (0, 0)
    assert "Authorization" not in server.received[0].headers
    assert server.received[1].headers["Authorization"] == "Token mine"


def test_a_relay_slower_than_the_timeout_is_reported_not_waited_for(app: Flask, tmp_path: Path) -> None:
    path, _ = event_file(tmp_path, "slow.json")
    server = ScriptedServer(Answer(202, {"type": "event_processing_response"}, delay=0.4))
    with serve(server.app) as url:
        result = send(app, str(path), "--url", url, "--timeout", "0.1")
    assert (result.exit_code, result.output) == (1, f"{path} - timeout\n")


def test_a_url_requests_cannot_use_is_named_by_its_error(app: Flask, tmp_path: Path) -> None:
    path, _ = event_file(tmp_path, "one.json")
    result = send(app, str(path), "--url", "relay.example/firehose")
    assert (result.exit_code, result.output) == (1, f"{path} - MissingSchema\n")
