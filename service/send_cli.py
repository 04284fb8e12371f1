"""`flask --app service:create_app firehose send FILE_OR_DIR [--url URL] [--token TOKEN]`.

Posts Firehose messages to a running relay the way mParticle does, for people integrating:
one JSON file, or every `*.json` in a folder in name order. Each file's bytes go out
exactly as they are on disk (no re-serialising, so 64-bit integers and key order survive).
One line per file: the file, the HTTP status, and the response type or error code. The
exit status is 1 when any answer was not 2xx, so scripts and CI can rely on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import requests
from flask import current_app
from flask.cli import AppGroup

from common.config import Settings
from service.auth import usable_tokens

DEFAULT_URL = "http://127.0.0.1:8000/firehose"
# Connecting must be quick on loopback or a LAN; the answer may take the relay's whole budget and more.
CONNECT_TIMEOUT = 3.05

firehose_cli = AppGroup("firehose", help="Talk to a running Firehose Relay the way mParticle does.")


def message_files(target: Path) -> list[Path]:
    """The file itself, or the folder's *.json files sorted by name."""
    if target.is_dir():
        return sorted(path for path in target.glob("*.json") if path.is_file())
    return [target]


def _detail(response: requests.Response) -> str:
    try:
        answer: Any = response.json()
    except ValueError:
        return "non_json_answer"
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return error["code"]
        if isinstance(answer.get("type"), str):
            return answer["type"]
    return "-"


def send_file(
    session: requests.Session, path: Path, url: str, token: str | None, timeout: float
) -> tuple[int | None, str]:
    """(status, response type or error code); status None when no answer came."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Token {token}"
    try:
        response = session.post(
            url, data=path.read_bytes(), headers=headers, timeout=(CONNECT_TIMEOUT, timeout), allow_redirects=False
        )
    except requests.Timeout:
        return None, "timeout"
    except requests.ConnectionError:
        return None, "connection_error"
    except requests.RequestException as exc:
        return None, type(exc).__name__
    return response.status_code, _detail(response)


@firehose_cli.command("send")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The relay's Firehose endpoint.")
@click.option(
    "--token",
    default=None,
    help="Sent as 'Authorization: Token <token>'. Default: the first of FIREHOSE_AUTH_TOKEN; '' sends none.",
)
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds per answer.")
def send(target: Path, url: str, token: str | None, timeout: float) -> None:
    """Post a message file, or every *.json in a folder, and print each answer."""
    files = message_files(target)
    if not files:
        raise click.UsageError(f"no *.json files in {target}")
    if token is None:
        settings: Settings = current_app.config["SETTINGS"]
        tokens = usable_tokens(settings.auth_tokens)
        token = tokens[0] if tokens else None
    failed = 0
    with requests.Session() as session:
        for path in files:
            status, detail = send_file(session, path, url, token, timeout)
            ok = status is not None and 200 <= status < 300
            failed += not ok
            click.echo(f"{path} {status if status is not None else '-'} {detail}")
    if failed:
        raise click.exceptions.Exit(1)
