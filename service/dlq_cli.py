"""`flask dlq ...`: inspect, replay and purge the dead letters.

Needs only Redis, the key names and the dead-letter store (common/): a replayed letter goes
back into the inbox stream, where the workers' pump takes it like new traffic.

`list` and `replay` select letters by account, reason, last status, type and time of death, and
stream: the store is read a page at a time (common/dead_letters.py `scan`), and a replay moves
each page's bodies into the inbox inside Redis, so 100,000 letters take no more memory here
than 500 do.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import orjson
import redis
from flask import current_app
from flask.cli import AppGroup

from common import dead_letters
from common.config import Settings
from common.dead_letters import AmbiguousLetter, DeadLetter, Filter
from common.keys import Keys
from common.redis_conn import worker_redis

dlq_cli = AppGroup("dlq", help="Inspect, replay and purge the dead letters.")

F = TypeVar("F", bound=Callable[..., Any])


def _store() -> tuple[redis.Redis, Keys, int]:
    settings: Settings = current_app.config["SETTINGS"]
    return worker_redis(settings), Keys(settings.key_prefix), settings.dlq_retention_seconds


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------- options

_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class When(click.ParamType):
    """An ISO 8601 time (without a zone: UTC) or an age such as 90s, 15m, 2h, 7d (that long ago)."""

    name = "when"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        if match := _AGO.fullmatch(text):
            return dt.datetime.now(dt.UTC).timestamp() - float(match[1]) * _UNIT_SECONDS[match[2]]
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is neither an ISO 8601 time nor an age such as 15m, 2h or 7d", param, ctx)
        return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


class Account(click.ParamType):
    """An account id, or `-` for letters whose message named no account."""

    name = "account"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip()
        if text in (dead_letters.NO_ACCOUNT, "none"):
            return None
        try:
            return int(text)
        except ValueError:
            self.fail(f"{text!r} is not an account id (an integer, or - for none)", param, ctx)


class Status(click.ParamType):
    """An HTTP status, or `none` for letters that got no answer."""

    name = "status"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in ("none", dead_letters.NO_ACCOUNT):
            return None
        if text.isdigit():
            return int(text)
        self.fail(f"{text!r} is not an HTTP status (or none)", param, ctx)


def _filter_options(command: F) -> F:
    options = [
        click.option("--account", "accounts", type=Account(), multiple=True, help="Only this account's (repeatable)."),
        click.option("--reason", "reasons", multiple=True, help="Only letters dead for this reason (repeatable)."),
        click.option(
            "--status", "statuses", type=Status(), multiple=True, help="Only this last status, or none (repeatable)."
        ),
        click.option("--type", "types", multiple=True, help="Only this message type (repeatable)."),
        click.option("--since", type=When(), help="Dead at or after: ISO 8601 (UTC unless it says) or an age (2h)."),
        click.option("--until", type=When(), help="Dead before: ISO 8601 or an age (15m)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _filter(
    accounts: tuple[int | None, ...],
    reasons: tuple[str, ...],
    statuses: tuple[int | None, ...],
    types: tuple[str, ...],
    since: float | None,
    until: float | None,
) -> Filter:
    return Filter(frozenset(accounts), frozenset(reasons), frozenset(statuses), frozenset(types), since, until)


def _print(letter: DeadLetter, as_json: bool) -> None:
    if as_json:
        click.echo(orjson.dumps(letter.summary()).decode())
    else:
        click.echo(
            f"{letter.id}  {_when(letter.dead_at)}  {letter.type or '-'}  account={letter.account_id}  "
            f"reason={letter.reason}  status={letter.last_status}  attempts={letter.attempts}  "
            f"expires={_when(letter.expires_at)}"
        )


def _resolve(client: redis.Redis, keys: Keys, letter_id: str, which: Filter) -> DeadLetter | None:
    """The one letter `letter_id` names among those `which` takes (an id, or `<account>:<id>`)."""
    if len(which.accounts) == 1:
        [account] = which.accounts
        found = [letter for letter in [dead_letters.get(client, keys, letter_id, account)] if letter]
    else:
        found = dead_letters.find(client, keys, letter_id)
    found = [
        letter
        for letter in found
        if which.matches(letter)
        and (which.since is None or letter.dead_at >= which.since)
        and (which.until is None or letter.dead_at < which.until)
    ]
    if len(found) > 1:
        raise AmbiguousLetter(letter_id, [letter.account_id for letter in found])
    return found[0] if found else None


@contextmanager
def _progress(length: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal; none (and nothing printed) otherwise."""
    stream = sys.stderr
    if not stream.isatty():
        yield None
        return
    with click.progressbar(length=length, label=label, file=stream, show_pos=True, show_percent=True) as bar:
        yield bar.update


# ------------------------------------------------------------------------- commands


@dlq_cli.command("list")
@click.option("--limit", default=100, show_default=True, help="How many, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_filter_options
def list_command(limit: int, as_json: bool, **selection: Any) -> None:
    """The dead letters, without their bodies, and when each expires."""
    client, keys, retention = _store()
    shown = 0
    if limit > 0:
        for letter in dead_letters.scan(client, keys, _filter(**selection), retention_seconds=retention):
            _print(letter, as_json)
            shown += 1
            if shown >= limit:
                break
    if not as_json:
        click.echo(f"{dead_letters.count(client, keys, retention)} dead letter(s) in all", err=True)


@dlq_cli.command("show")
@click.argument("letter_id")
@click.option(
    "--account", "accounts", type=Account(), multiple=True, help="Of this account, when several share the id."
)
def show_command(letter_id: str, accounts: tuple[int | None, ...]) -> None:
    """One dead letter, with its message; every settings value (API keys) is redacted."""
    client, keys, _ = _store()
    try:
        letter = _resolve(client, keys, letter_id, Filter(accounts=frozenset(accounts)))
    except AmbiguousLetter as exc:
        raise click.ClickException(str(exc)) from None
    if letter is None:
        raise click.ClickException(f"no dead letter {letter_id}")
    out = letter.summary() | {"message": letter.redacted_message()}
    click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


@dlq_cli.command("replay")
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter (that the filters take).")
@click.option("--dry-run", is_flag=True, help="List what would be replayed; replay nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: one JSON object per line.")
@_filter_options
def replay_command(
    letter_ids: tuple[str, ...], replay_all: bool, dry_run: bool, as_json: bool, **selection: Any
) -> None:
    """Send dead letters back through the inbox: same rate limit and idempotency as new traffic.

    Name letters by id, or select them with --all and/or the filters (--account, --reason,
    --status, --type, --since, --until); named ids are replayed only if the filters take them.
    """
    which = _filter(**selection)
    if not letter_ids and not replay_all and which.is_everything:
        raise click.UsageError("name dead letter ids, or --all, or filters such as --account")
    client, keys, retention = _store()
    if letter_ids:
        _replay_named(client, keys, letter_ids, which, dry_run, as_json)
        return
    replayed = 0
    page: list[DeadLetter] = []
    with _progress(dead_letters.span(client, keys, which, retention), "replaying") as advance:
        for letter in dead_letters.scan(client, keys, which, retention_seconds=retention, progress=advance):
            if dry_run:
                _print(letter, as_json)
                replayed += 1
                continue
            page.append(letter)
            if len(page) >= dead_letters.PAGE:
                replayed += dead_letters.replay_letters(client, keys, page)
                page = []
        replayed += dead_letters.replay_letters(client, keys, page)
    _replayed(replayed, dry_run)


def _replayed(n: int, dry_run: bool) -> None:
    if dry_run:
        click.echo(f"would replay {n} (dry run: nothing replayed)", err=True)
    else:
        click.echo(f"replayed {n}")


def _replay_named(
    client: redis.Redis, keys: Keys, letter_ids: tuple[str, ...], which: Filter, dry_run: bool, as_json: bool
) -> None:
    missing: list[str] = []
    problems: list[str] = []
    replayed = 0
    for letter_id in letter_ids:
        try:
            letter = _resolve(client, keys, letter_id, which)
        except AmbiguousLetter as exc:
            problems.append(str(exc))
            continue
        if letter is None:
            missing.append(letter_id)
        elif dry_run:
            _print(letter, as_json)
            replayed += 1
        elif dead_letters.replay_letters(client, keys, [letter]):
            replayed += 1
        else:
            missing.append(letter_id)  # replayed or purged by someone else meanwhile
    _replayed(replayed, dry_run)
    if missing:
        problems.append(f"not found: {' '.join(missing)}")
    if problems:
        raise click.ClickException("; ".join(problems))


@dlq_cli.command("purge")
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Delete every dead letter.")
@click.option("--account", "accounts", type=Account(), multiple=True, help="Of this account, when several share an id.")
@click.confirmation_option(prompt="Delete these dead letters for good?")
def purge_command(letter_ids: tuple[str, ...], purge_all: bool, accounts: tuple[int | None, ...]) -> None:
    """Delete dead letters for good."""
    client, keys, _ = _store()
    if purge_all:
        click.echo(f"purged {dead_letters.purge(client, keys)}")
        return
    if not letter_ids:
        raise click.UsageError("name dead letter ids, or --all")
    which = Filter(accounts=frozenset(accounts))
    purged = 0
    for letter_id in letter_ids:
        try:
            letter = _resolve(client, keys, letter_id, which)
        except AmbiguousLetter as exc:
            raise click.ClickException(f"{exc} (purged {purged} before it)") from None
        purged += dead_letters.delete_letters(client, keys, [letter] if letter else [])
    click.echo(f"purged {purged}")
