"""`flask firehose send`, through click's test runner, against a real gunicorn on loopback.
(Usage errors and no relay listening: tests/unit/test_send_cli.py.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask

from common.keys import Keys
from devtools.procs import start_web
from tests.support import base_env, sample
from tests.support.send_cli import TOKEN, cli_app, event_file, send


@pytest.fixture(scope="module")
def relay(redis_url: str, logs_dir: Path) -> Iterator[dict[str, Any]]:
    key_prefix = f"cli{uuid.uuid4().hex[:8]}"
    proc, url = start_web(
        base_env(redis_url, FIREHOSE_AUTH_TOKEN=TOKEN, REDIS_KEY_PREFIX=key_prefix), logs_dir, name="web-cli"
    )
    try:
        yield {"url": f"{url}/firehose", "keys": Keys(key_prefix)}
    finally:
        proc.stop()


@pytest.fixture
def app(redis_url: str) -> Flask:
    return cli_app(redis_url)


def test_a_folder_is_sent_file_by_file_in_name_order(app: Flask, relay: dict[str, Any], tmp_path: Path) -> None:
    event_file(tmp_path, "b_events.json")
    (tmp_path / "a_registration.json").write_bytes(sample("3.2.0", "ModuleRegistrationRequest.json"))
    (tmp_path / "c_broken.json").write_bytes(b'{"type": ')
    (tmp_path / "notes.txt").write_text("not a message")

    result = send(app, str(tmp_path), "--url", relay["url"])

    assert result.output.splitlines() == [
        f"{tmp_path / 'a_registration.json'} 200 module_registration_response",
        f"{tmp_path / 'b_events.json'} 202 event_processing_response",
        f"{tmp_path / 'c_broken.json'} 400 invalid_json",
    ]
    # One answer was not 2xx.
    assert result.exit_code == 1


def test_one_file_sent_as_is_exits_0(
    app: Flask, relay: dict[str, Any], tmp_path: Path, redis_client: redis_lib.Redis
) -> None:
    path, message = event_file(tmp_path, "batch.json", mpid=-(2**63))
    result = send(app, str(path), "--url", relay["url"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{path} 202 event_processing_response\n"
    # Stored byte for byte: indentation, key order and the 64-bit mpid as they are on disk.
    stored = {fields[b"id"].decode(): fields[b"body"] for _, fields in redis_client.xrange(relay["keys"].inbox)}
    assert stored[message["id"]] == path.read_bytes()
    # The token never appears in what the CLI prints.
    assert TOKEN not in result.output


def test_the_default_token_is_the_first_configured_one(app: Flask, relay: dict[str, Any], tmp_path: Path) -> None:
    path, _ = event_file(tmp_path, "batch.json")
    assert send(app, str(path), "--url", relay["url"], "--token", "wrong-token").output.endswith(" 401 unauthorized\n")
    assert send(app, str(path), "--url", relay["url"], "--token", "").exit_code == 1
    assert send(app, str(path), "--url", relay["url"], "--token", TOKEN).exit_code == 0


def test_a_sub_path_url_works(app: Flask, relay: dict[str, Any], tmp_path: Path) -> None:
    path, _ = event_file(tmp_path, "batch.json")
    result = send(app, str(path), "--url", relay["url"] + "/events")
    assert result.exit_code == 0, result.output


def test_an_invalid_envelope_prints_its_code(app: Flask, relay: dict[str, Any], tmp_path: Path) -> None:
    path, _ = event_file(tmp_path, "bad.json", id="not-a-uuid")
    result = send(app, str(path), "--url", relay["url"])
    assert result.exit_code == 1
    assert result.output == f"{path} 400 invalid_envelope\n"
