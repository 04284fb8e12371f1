"""`flask dlq ...`: inspect, replay and purge the dead letters.

Needs only Redis, the key names and the dead-letter store (common/): a replayed letter goes
back into the inbox stream, where the workers' pump takes it like new traffic.
"""

from __future__ import annotations

import datetime as dt

import click
import orjson
import redis
from flask import current_app
from flask.cli import AppGroup

from common import dead_letters
from common.config import Settings
from common.keys import Keys
from common.redis_conn import worker_client

dlq_cli = AppGroup("dlq", help="Inspect, replay and purge the dead letters.")


def _redis_and_keys() -> tuple[redis.Redis, Keys]:
    settings: Settings = current_app.config["SETTINGS"]
    return worker_client(settings.redis_url, ssl_cert_reqs=settings.redis_ssl_cert_reqs), Keys(settings.key_prefix)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dlq_cli.command("list")
@click.option("--limit", default=100, show_default=True, help="How many, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(limit: int, as_json: bool) -> None:
    """The dead letters, without their bodies."""
    client, keys = _redis_and_keys()
    letters = dead_letters.list_letters(client, keys, limit)
    for letter in letters:
        if as_json:
            click.echo(orjson.dumps(letter.summary()).decode())
        else:
            click.echo(
                f"{letter.id}  {_when(letter.dead_at)}  {letter.type or '-'}  account={letter.account_id}  "
                f"reason={letter.reason}  status={letter.last_status}  attempts={letter.attempts}"
            )
    if not as_json:
        click.echo(f"{dead_letters.count(client, keys)} dead letter(s) in all", err=True)


@dlq_cli.command("show")
@click.argument("letter_id")
def show_command(letter_id: str) -> None:
    """One dead letter, with its message; every settings value (API keys) is redacted."""
    client, keys = _redis_and_keys()
    letter = dead_letters.get(client, keys, letter_id)
    if letter is None:
        raise click.ClickException(f"no dead letter {letter_id}")
    out = letter.summary() | {"message": letter.redacted_message()}
    click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


@dlq_cli.command("replay")
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
def replay_command(letter_ids: tuple[str, ...], replay_all: bool) -> None:
    """Send dead letters back through the inbox: same rate limit and idempotency as new traffic."""
    if not letter_ids and not replay_all:
        raise click.UsageError("name dead letter ids, or --all")
    client, keys = _redis_and_keys()
    if replay_all:
        letter_ids = tuple(letter.id for letter in dead_letters.list_letters(client, keys, limit=10**9))
    missing = [i for i in letter_ids if not dead_letters.replay(client, keys, i)]
    click.echo(f"replayed {len(letter_ids) - len(missing)}")
    if missing:
        raise click.ClickException(f"not found: {' '.join(missing)}")


@dlq_cli.command("purge")
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Delete every dead letter.")
@click.confirmation_option(prompt="Delete these dead letters for good?")
def purge_command(letter_ids: tuple[str, ...], purge_all: bool) -> None:
    """Delete dead letters for good."""
    client, keys = _redis_and_keys()
    if purge_all:
        click.echo(f"purged {dead_letters.purge(client, keys)}")
        return
    if not letter_ids:
        raise click.UsageError("name dead letter ids, or --all")
    click.echo(f"purged {sum(dead_letters.purge(client, keys, i) for i in letter_ids)}")
