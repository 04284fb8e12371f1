"""The dead-letter store (common/dead_letters.py) on the suite's Redis, and `flask dlq` through
Flask's CLI runner; each test under a key prefix of its own."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import orjson
import redis as redis_lib
from flask import Flask

from common import dead_letters, stats
from common.config import Settings
from common.keys import Keys
from common.redaction import REDACTED
from service import create_app
from tests.support.dead_letter_store import add_letter, attempt_against, dlq, letter_message
from tests.support.loopback import Answer
from workers.delivery import Action
from workers.grouping import plan_jobs

API_KEY = "fixture-api-key-3.2.0"


def _message() -> dict[str, Any]:
    return letter_message()


def _add(client: redis_lib.Redis, keys: Keys, **changes: Any) -> dead_letters.DeadLetter:
    return add_letter(client, keys, _message(), **({"error": "HTTP 400: bad batch", "attempts": 3} | changes))


def _unreadable(client: redis_lib.Redis, keys: Keys, message_id: str | None) -> dead_letters.DeadLetter:
    """A letter as the delivery leaves a body that is not JSON: no id, account or type to go by."""
    return dead_letters.add(
        client, keys, "{not json", reason="invalid_json", message_id=message_id, account_id=None, message_type=None
    )


# ---------------------------------------------------------------- the store


def test_a_letter_is_kept_whole_indexed_and_counted(client: redis_lib.Redis, keys: Keys) -> None:
    letter = _add(client, keys)
    assert letter.id == letter.message_id
    assert dead_letters.get(client, keys, letter.id) == letter
    assert dead_letters.count(client, keys) == 1
    assert int(client.hget(keys.stats, stats.DEAD_LETTERED) or 0) == 1
    assert dead_letters.get(client, keys, "no-such-id") is None


def test_a_letter_without_a_message_id_gets_an_id_of_its_own(client: redis_lib.Redis, keys: Keys) -> None:
    first = _unreadable(client, keys, None)
    second = _unreadable(client, keys, None)
    # Two unreadable bodies must not overwrite each other under one id.
    assert first.id != second.id and uuid.UUID(first.id) and first.message_id is None
    assert first.attempts == 0 and first.last_status is None and first.error is None
    assert dead_letters.count(client, keys) == 2


def test_the_list_is_oldest_first_and_limited(client: redis_lib.Redis, keys: Keys) -> None:
    assert dead_letters.list_letters(client, keys) == []
    # Ids in reverse alphabetical order: the order must come from the time, not the id.
    added = [_add(client, keys, message_id=name) for name in ("c-letter", "b-letter", "a-letter")]
    assert [letter.id for letter in dead_letters.list_letters(client, keys)] == ["c-letter", "b-letter", "a-letter"]
    assert [letter.id for letter in dead_letters.list_letters(client, keys, limit=2)] == ["c-letter", "b-letter"]
    assert dead_letters.list_letters(client, keys)[0] == added[0]


def test_the_summary_leaves_the_body_out_and_the_message_is_redacted(client: redis_lib.Redis, keys: Keys) -> None:
    letter = _add(client, keys)
    summary = letter.summary()
    assert "body" not in summary and summary["id"] == letter.id and summary["error"] == "HTTP 400: bad batch"
    shown = letter.redacted_message()
    settings = orjson.loads(letter.body)["account"]["account_settings"]
    assert len(settings) > 1 and shown["account"]["account_settings"] == dict.fromkeys(settings, REDACTED)
    assert shown["events"] == orjson.loads(letter.body)["events"]
    assert API_KEY not in orjson.dumps(shown).decode()


def test_an_unreadable_body_has_no_message_to_show(client: redis_lib.Redis, keys: Keys) -> None:
    letter = _unreadable(client, keys, "x")
    assert letter.redacted_message() is None


def test_a_deeply_nested_body_is_shown_cut_short(client: redis_lib.Redis, keys: Keys) -> None:
    deep: Any = "bottom"
    for _ in range(200):
        deep = [deep]
    letter = _add(client, keys)
    letter.body = orjson.dumps({"type": "x", "nested": deep}).decode()
    shown = letter.redacted_message()
    # Printable by any JSON encoder: no deeper than the cut.
    assert "[nested too deep to show]" in orjson.dumps(shown).decode()


def test_replay_puts_the_message_back_into_the_inbox_as_a_first_attempt(client: redis_lib.Redis, keys: Keys) -> None:
    letter = _add(client, keys, attempts=8, reason="max_attempts")
    other = _add(client, keys)
    assert dead_letters.replay(client, keys, letter.id) is True
    [(entry_id, fields)] = client.xrange(keys.inbox)
    assert fields == {b"body": letter.body.encode(), b"type": letter.type.encode(), b"id": letter.id.encode()}
    # No attempt and no first_seen go with it: a replay starts over, its age from now.
    [job] = plan_jobs([(entry_id, fields)], max_messages=50, max_events=1000)
    assert (job.bodies, job.attempt) == ([letter.body], 1)
    assert job.first_seen_ms == int(entry_id.split(b"-")[0]) and job.first_seen_ms >= letter.dead_at * 1000 - 1
    assert dead_letters.get(client, keys, letter.id) is None
    assert [x.id for x in dead_letters.list_letters(client, keys)] == [other.id]
    assert dead_letters.replay(client, keys, letter.id) is False
    assert client.xlen(keys.inbox) == 1


def test_a_letter_of_no_known_type_is_replayed_as_a_single_message(client: redis_lib.Redis, keys: Keys) -> None:
    letter = _unreadable(client, keys, None)
    assert dead_letters.replay(client, keys, letter.id)
    [(entry_id, fields)] = client.xrange(keys.inbox)
    assert fields[b"type"] == b""
    [job] = plan_jobs([(entry_id, fields)], max_messages=50, max_events=1000)
    assert (job.task, job.bodies, job.task_id) == ("single", ["{not json"], letter.id)


def test_purge_one_or_all(client: redis_lib.Redis, keys: Keys) -> None:
    first, second, third = (_add(client, keys) for _ in range(3))
    assert dead_letters.purge(client, keys, first.id) == 1
    assert dead_letters.purge(client, keys, first.id) == 0
    assert [x.id for x in dead_letters.list_letters(client, keys)] == [second.id, third.id]
    assert dead_letters.purge(client, keys) == 2
    assert dead_letters.count(client, keys) == 0 and not client.exists(keys.dead_letters, keys.dead_letter_index)
    assert dead_letters.purge(client, keys) == 0
    # Purging is not delivering: the counter of what was dead-lettered stays.
    assert int(client.hget(keys.stats, stats.DEAD_LETTERED) or 0) == 3


def test_a_stored_error_never_holds_the_api_key_the_partner_echoed(settings: Settings) -> None:
    """Through the real path: partner answer → reference client → delivery → dead letter → `dlq show`."""
    message = _message()
    answer = Answer(403, f"key {API_KEY} is not allowed; Authorization: Bearer {API_KEY}")
    decision, server = attempt_against(settings, answer, message, 2)
    assert decision is not None and decision.action is Action.DEAD
    assert server.received[0].headers["Authorization"] == f"Bearer {API_KEY}"
    client = redis_lib.Redis.from_url(settings.redis_url)
    try:
        letter = dead_letters.get(client, Keys(settings.key_prefix), message["id"])
    finally:
        client.close()
    assert letter is not None and (letter.reason, letter.last_status, letter.attempts) == ("partner_rejected", 403, 2)
    assert letter.error is not None and letter.error.startswith("HTTP 403: key [redacted] is not allowed")
    assert API_KEY not in letter.error
    shown = dlq(create_app(settings), "show", letter.id)
    assert shown.exit_code == 0 and API_KEY not in shown.output and "[redacted]" in shown.output


# ---------------------------------------------------------------- flask dlq


def test_list_prints_a_line_per_letter_and_the_total_on_stderr(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    first = _add(client, keys, last_status=None, attempts=1, reason="max_age")
    second = _unreadable(client, keys, "no-type")
    result = dlq(app, "list")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{first.id}  20") and lines[0].endswith(
        f"Z  event_processing_request  account={first.account_id}  reason=max_age  status=None  attempts=1"
        f"  expires={dt.datetime.fromtimestamp(first.expires_at, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
    )
    assert "Z  -  account=None  reason=invalid_json  status=None  attempts=0  expires=20" in lines[1]
    assert lines[1].startswith(f"{second.id}  ")
    assert result.stderr == "2 dead letter(s) in all\n"
    assert API_KEY not in result.output


def test_list_limit_still_counts_them_all(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    letters = [_add(client, keys) for _ in range(3)]
    result = dlq(app, "list", "--limit", "1")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == [letters[0].id]
    assert result.stderr == "3 dead letter(s) in all\n"


def test_list_json_is_one_summary_per_line_and_nothing_else(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    letters = [_add(client, keys) for _ in range(2)]
    result = dlq(app, "list", "--json")
    assert result.exit_code == 0 and result.stderr == ""
    assert [orjson.loads(line) for line in result.stdout.splitlines()] == [x.summary() for x in letters]


def test_list_of_an_empty_store(app: Flask) -> None:
    result = dlq(app, "list")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "0 dead letter(s) in all\n")
    assert dlq(app, "list", "--json").output == ""


def test_show_prints_the_summary_and_the_redacted_message(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    letter = _add(client, keys)
    result = dlq(app, "show", letter.id)
    assert result.exit_code == 0
    shown = orjson.loads(result.stdout)
    assert shown == letter.summary() | {"message": letter.redacted_message()}
    assert shown["message"]["account"]["account_settings"]["apiKey"] == REDACTED
    assert API_KEY not in result.output and "\n  " in result.stdout  # indented for a person


def test_show_of_an_unknown_id_fails(app: Flask) -> None:
    result = dlq(app, "show", "no-such-id")
    assert result.exit_code == 1 and "Error: no dead letter no-such-id" in result.stderr


def test_replay_of_ids(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    first, second, kept = (_add(client, keys) for _ in range(3))
    result = dlq(app, "replay", first.id, second.id)
    assert (result.exit_code, result.stdout) == (0, "replayed 2\n")
    assert [fields[b"id"].decode() for _, fields in client.xrange(keys.inbox)] == [first.id, second.id]
    assert [x.id for x in dead_letters.list_letters(client, keys)] == [kept.id]


def test_replay_with_unknown_ids_replays_the_rest_and_fails(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    letter = _add(client, keys)
    result = dlq(app, "replay", "missing-1", letter.id, "missing-2")
    assert result.exit_code == 1
    assert result.stdout == "replayed 1\n"
    assert "Error: not found: missing-1 missing-2" in result.stderr
    assert client.xlen(keys.inbox) == 1 and dead_letters.count(client, keys) == 0


def test_replay_all(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    letters = [_add(client, keys) for _ in range(3)]
    result = dlq(app, "replay", "--all")
    assert (result.exit_code, result.stdout) == (0, "replayed 3\n")
    # Oldest first, the order they died in.
    assert [fields[b"id"].decode() for _, fields in client.xrange(keys.inbox)] == [x.id for x in letters]
    assert dead_letters.count(client, keys) == 0


def test_replay_without_ids_is_a_usage_error(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    _add(client, keys)
    result = dlq(app, "replay")
    assert result.exit_code == 2 and "name dead letter ids, or --all" in result.stderr
    assert client.xlen(keys.inbox) == 0 and dead_letters.count(client, keys) == 1


def test_replay_all_of_an_empty_store_replays_nothing(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    result = dlq(app, "replay", "--all")
    assert (result.exit_code, result.stdout) == (0, "replayed 0\n")


def test_purge_asks_first_and_a_no_keeps_everything(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    letter = _add(client, keys)
    result = dlq(app, "purge", letter.id, stdin="n\n")
    assert result.exit_code == 1 and "Delete these dead letters for good?" in result.output
    assert "Aborted" in result.output and dead_letters.count(client, keys) == 1


def test_purge_after_a_yes(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    letter, kept = _add(client, keys), _add(client, keys)
    result = dlq(app, "purge", letter.id, stdin="y\n")
    assert result.exit_code == 0 and result.stdout.endswith("purged 1\n")
    assert [x.id for x in dead_letters.list_letters(client, keys)] == [kept.id]


def test_purge_ids_counts_only_what_was_there(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    letter, kept = _add(client, keys), _add(client, keys)
    result = dlq(app, "purge", "--yes", letter.id, "missing")
    assert (result.exit_code, result.stdout) == (0, "purged 1\n")
    assert [x.id for x in dead_letters.list_letters(client, keys)] == [kept.id]


def test_purge_all(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    for _ in range(3):
        _add(client, keys)
    assert dlq(app, "purge", "--all", "--yes").stdout == "purged 3\n"
    assert dead_letters.count(client, keys) == 0
    again = dlq(app, "purge", "--all", "--yes")
    assert (again.exit_code, again.stdout) == (0, "purged 0\n")


def test_purge_without_ids_is_a_usage_error(app: Flask, client: redis_lib.Redis, keys: Keys) -> None:
    _add(client, keys)
    result = dlq(app, "purge", "--yes")
    assert result.exit_code == 2 and "name dead letter ids, or --all" in result.stderr
    assert dead_letters.count(client, keys) == 1


def test_the_commands_only_see_their_own_apps_prefix(
    app: Flask, client: redis_lib.Redis, keys: Keys, redis_url: str
) -> None:
    letter = _add(client, keys)
    other = create_app(Settings(redis_url=redis_url, broker_url=redis_url, key_prefix=f"t{uuid.uuid4().hex[:8]}"))
    assert dlq(other, "list", "--json").stdout == ""
    assert dlq(other, "replay", letter.id).exit_code == 1
    assert dead_letters.count(client, keys) == 1
