"""What the `flask firehose send` tests of both tiers share: the CLI's app, running it, message files."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
from click.testing import Result
from flask import Flask

from common.config import Settings
from service import create_app
from tests.support import sample

TOKEN = f"cli-{uuid.uuid4().hex}"


def cli_app(redis_url: str) -> Flask:
    """The CLI's own app: its FIREHOSE_AUTH_TOKEN is where the default token comes from."""
    return create_app(Settings(redis_url=redis_url, broker_url=redis_url, auth_tokens=(TOKEN, "older-token")))


def send(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["firehose", "send", *args])


def event_file(folder: Path, name: str, **changes: Any) -> tuple[Path, dict[str, Any]]:
    """The iOS fixture with a fresh id (and `changes`), written as a file to send."""
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = str(uuid.uuid4())
    message.update(changes)
    path = folder / name
    path.write_bytes(orjson.dumps(message, option=orjson.OPT_INDENT_2))
    return path, message
