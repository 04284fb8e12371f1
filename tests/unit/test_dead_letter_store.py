"""The dead-letter store's keying, expiry, paging and filters (common/dead_letters.py), and `flask dlq
list/replay` with filters through Flask's CLI runner, on the suite's Redis under a prefix per test.
(Many letters, the real `flask` command and its progress bar: tests/e2e/test_dlq_replay.py.)"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any
from urllib.parse import quote, quote_plus

import orjson
import pytest
import redis as redis_lib
from flask import Flask

from common import dead_letters
from common.config import Settings
from common.dead_letters import AmbiguousLetter
from common.keys import Keys
from tests.support.dead_letter_store import add_letter, attempt_against, dlq, letter_message
from tests.support.loopback import Answer

ACCOUNT_A, ACCOUNT_B = 1001, 2002


def _message(account_id: int, message_id: str | None = None, api_key: str = "fixture-api-key") -> dict[str, Any]:
    return letter_message(account_id, message_id, api_key)


def _add(
    client: redis_lib.Redis, keys: Keys, account_id: int, message_id: str | None = None, **changes: Any
) -> dead_letters.DeadLetter:
    return add_letter(client, keys, _message(account_id, message_id), **changes)


def _letter_key(keys: Keys, letter: dead_letters.DeadLetter) -> str:
    return f"{keys.dead_letters}:letter:{letter.ref}"


def _inbox_ids(client: redis_lib.Redis, keys: Keys) -> list[str]:
    return [fields[b"id"].decode() for _, fields in client.xrange(keys.inbox)]


# ------------------------------------------------------------ per account and message id


def test_another_accounts_letter_with_the_same_id_never_overwrites_one(
    app: Flask, client: redis_lib.Redis, keys: Keys
) -> None:
    shared = str(uuid.uuid4())
    mine = _add(client, keys, ACCOUNT_A, shared, reason="max_attempts")
    theirs = _add(client, keys, ACCOUNT_B, shared, reason="partner_rejected")
    assert dead_letters.count(client, keys) == 2
    assert dead_letters.get(client, keys, shared, ACCOUNT_A) == mine
    assert dead_letters.get(client, keys, shared, ACCOUNT_B) == theirs
    assert orjson.loads(mine.body)["account"]["account_id"] == ACCOUNT_A
    # Named by id alone, the store will not guess which account's letter is meant.
    with pytest.raises(AmbiguousLetter):
        dead_letters.get(client, keys, shared)
    assert dead_letters.get(client, keys, mine.ref) == mine

    ambiguous = dlq(app, "show", shared)
    assert ambiguous.exit_code == 1 and "2 dead letters have id" in ambiguous.stderr and "--account" in ambiguous.stderr
    shown = dlq(app, "show", shared, "--account", str(ACCOUNT_B))
    assert shown.exit_code == 0 and orjson.loads(shown.stdout)["reason"] == "partner_rejected"
    assert dlq(app, "replay", shared).exit_code == 1 and client.xlen(keys.inbox) == 0

    replayed = dlq(app, "replay", shared, "--account", str(ACCOUNT_A))
    assert (replayed.exit_code, replayed.stdout) == (0, "replayed 1\n")
    assert dead_letters.get(client, keys, shared) == theirs  # the other account's is still there


# ------------------------------------------------------------------------------ expiry


def test_a_letter_expires_after_the_retention_and_list_shows_when(
    app: Flask, client: redis_lib.Redis, keys: Keys
) -> None:
    letter = _add(client, keys, ACCOUNT_A, retention_seconds=3600)
    assert letter.expires_at == letter.dead_at + 3600
    assert 3_590_000 < client.pttl(_letter_key(keys, letter)) <= 3_600_000
    # The index lives as long as its newest letter, so an idle store goes away whole.
    assert 3590 < client.ttl(keys.dead_letter_index) <= 3600
    [line] = dlq(app, "list").stdout.splitlines()
    assert line.endswith(f"expires={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(letter.expires_at))}")
    assert orjson.loads(dlq(app, "list", "--json").stdout)["expires_at"] == letter.expires_at


def test_an_expired_letter_leaves_the_index_and_is_not_counted(client: redis_lib.Redis, keys: Keys) -> None:
    gone, kept = _add(client, keys, ACCOUNT_A), _add(client, keys, ACCOUNT_A)
    client.delete(_letter_key(keys, gone))  # what Redis does at its expiry
    assert [x.id for x in dead_letters.list_letters(client, keys)] == [kept.id]
    assert client.zrange(keys.dead_letter_index, 0, -1) == [kept.ref.encode()]
    # Index entries older than the retention are neither counted nor listed, whatever Redis still holds.
    old = _add(client, keys, ACCOUNT_B)
    client.zadd(keys.dead_letter_index, {old.ref: time.time() - 3 * 86400})
    assert dead_letters.count(client, keys, retention_seconds=2 * 86400) == 1
    assert [x.id for x in dead_letters.scan(client, keys, retention_seconds=2 * 86400)] == [kept.id]
    # ... and the next write or read takes them out.
    assert client.zscore(keys.dead_letter_index, old.ref) is None


def test_letters_of_the_previous_layout_are_moved_with_their_time_of_death(client: redis_lib.Redis, keys: Keys) -> None:
    message = _message(ACCOUNT_A)
    dead_at = time.time() - 60
    legacy = {
        "id": message["id"],
        "message_id": message["id"],
        "account_id": ACCOUNT_A,
        "type": message["type"],
        "reason": "max_attempts",
        "last_status": 503,
        "error": None,
        "attempts": 8,
        "dead_at": dead_at,
        "body": orjson.dumps(message).decode(),
    }
    client.hset(keys.dead_letters, message["id"], orjson.dumps(legacy))
    client.zadd(keys.dead_letter_index, {message["id"]: dead_at})
    letter = dead_letters.get(client, keys, message["id"])
    assert letter is not None and letter.body == legacy["body"] and letter.dead_at == dead_at
    assert letter.expires_at == dead_at + dead_letters.DEFAULT_RETENTION_SECONDS
    assert not client.exists(keys.dead_letters)
    assert client.zrange(keys.dead_letter_index, 0, -1) == [letter.ref.encode()]
    assert 0 < client.ttl(_letter_key(keys, letter)) <= dead_letters.DEFAULT_RETENTION_SECONDS - 59


# ---------------------------------------------------------------------- paging and replay


def test_a_scan_pages_by_cursor_through_deletions_and_equal_times(client: redis_lib.Redis, keys: Keys) -> None:
    letters = [_add(client, keys, ACCOUNT_A) for _ in range(7)]
    # Five letters dead at the very same moment: more than a page of equal scores.
    client.zadd(keys.dead_letter_index, {letter.ref: letters[0].dead_at for letter in letters[:5]})
    seen: list[str] = []
    page: list[dead_letters.DeadLetter] = []
    for letter in dead_letters.scan(client, keys, page=2):
        seen.append(letter.id)
        page.append(letter)
        if len(page) == 2:  # replaying as it goes removes what the scan has read
            assert dead_letters.replay_letters(client, keys, page) == 2
            page = []
    dead_letters.replay_letters(client, keys, page)
    assert sorted(seen) == sorted(x.id for x in letters) and len(seen) == 7
    assert sorted(_inbox_ids(client, keys)) == sorted(seen) and dead_letters.count(client, keys) == 0


def test_a_scan_never_comes_round_to_letters_added_after_it_began(client: redis_lib.Redis, keys: Keys) -> None:
    before = [_add(client, keys, ACCOUNT_A) for _ in range(4)]
    # As when replayed letters fail again at once: they must wait for the next replay.
    later: list[dead_letters.DeadLetter] = []
    seen = [
        x.id for x in dead_letters.scan(client, keys, page=2, progress=lambda n: later.append(_add(client, keys, 1)))
    ]
    assert seen == [x.id for x in before] and len(later) == 2  # one per page


def test_a_letter_is_replayed_once_however_many_replays_race(client: redis_lib.Redis, keys: Keys) -> None:
    letter = _add(client, keys, ACCOUNT_A)
    assert dead_letters.replay_letters(client, keys, [letter]) == 1
    assert dead_letters.replay_letters(client, keys, [letter]) == 0
    assert _inbox_ids(client, keys) == [letter.id]
    [(_, fields)] = client.xrange(keys.inbox)
    assert fields[b"body"].decode() == letter.body


# ------------------------------------------------------------------------------ filters


@pytest.fixture
def mixed(client: redis_lib.Redis, keys: Keys) -> dict[str, dead_letters.DeadLetter]:
    return {
        "a_rejected": _add(client, keys, ACCOUNT_A),
        "a_tired": _add(client, keys, ACCOUNT_A, reason="max_attempts", last_status=503),
        "b_rejected": _add(client, keys, ACCOUNT_B),
        "b_timeout": _add(
            client, keys, ACCOUNT_B, reason="max_age", last_status=None, message_type="dsr_processing_request"
        ),
        "a_late": _add(client, keys, ACCOUNT_A, reason="max_age", last_status=None),
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--account", str(ACCOUNT_A)], ["a_rejected", "a_tired", "a_late"]),
        (
            ["--account", str(ACCOUNT_A), "--account", str(ACCOUNT_B)],
            ["a_rejected", "a_tired", "b_rejected", "b_timeout", "a_late"],
        ),
        (["--reason", "max_age"], ["b_timeout", "a_late"]),
        (["--status", "none"], ["b_timeout", "a_late"]),
        (["--status", "503", "--status", "400", "--account", str(ACCOUNT_A)], ["a_rejected", "a_tired"]),
        (["--type", "dsr_processing_request"], ["b_timeout"]),
        (["--account", str(ACCOUNT_B), "--reason", "partner_rejected"], ["b_rejected"]),
        (["--account", "3003"], []),
    ],
)
def test_list_and_a_dry_run_take_the_same_filters(
    app: Flask,
    client: redis_lib.Redis,
    keys: Keys,
    mixed: dict[str, dead_letters.DeadLetter],
    args: list[str],
    expected: list[str],
) -> None:
    listed = dlq(app, "list", "--json", *args)
    dry = dlq(app, "replay", "--dry-run", "--json", *args)
    assert listed.exit_code == 0 and dry.exit_code == 0, (listed.output, dry.output)
    want = [mixed[name].summary() for name in expected]
    assert [orjson.loads(line) for line in listed.stdout.splitlines()] == want
    assert [orjson.loads(line) for line in dry.stdout.splitlines()] == want
    assert dry.stderr == f"would replay {len(expected)} (dry run: nothing replayed)\n"
    assert client.xlen(keys.inbox) == 0 and dead_letters.count(client, keys) == len(mixed)


def test_since_and_until_select_by_time_of_death(
    app: Flask, client: redis_lib.Redis, keys: Keys, mixed: dict[str, dead_letters.DeadLetter]
) -> None:
    middle = mixed["b_rejected"].dead_at
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(middle)) + f".{int(middle % 1 * 1e6):06d}+00:00"
    since = dlq(app, "list", "--json", "--since", iso)
    until = dlq(app, "list", "--json", "--until", iso)
    ids = lambda r: [orjson.loads(line)["id"] for line in r.stdout.splitlines()]  # noqa: E731
    assert ids(since) == [mixed[n].id for n in ("b_rejected", "b_timeout", "a_late")]
    assert ids(until) == [mixed[n].id for n in ("a_rejected", "a_tired")]
    assert ids(dlq(app, "list", "--json", "--since", "1h")) == [x.id for x in mixed.values()]
    assert ids(dlq(app, "list", "--json", "--until", "1h")) == []
    bad = dlq(app, "list", "--since", "yesterday")
    assert bad.exit_code == 2 and "neither an ISO 8601 time nor an age" in bad.stderr


def test_a_replay_by_account_replays_that_account_only(
    app: Flask, client: redis_lib.Redis, keys: Keys, mixed: dict[str, dead_letters.DeadLetter]
) -> None:
    result = dlq(app, "replay", "--account", str(ACCOUNT_B))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "replayed 2\n", "")  # no bar: not a terminal
    assert _inbox_ids(client, keys) == [mixed["b_rejected"].id, mixed["b_timeout"].id]
    left = [x.id for x in dead_letters.list_letters(client, keys)]
    assert left == [mixed[n].id for n in ("a_rejected", "a_tired", "a_late")]
    # Named ids are replayed only if the filters take them.
    refused = dlq(app, "replay", mixed["a_tired"].id, "--reason", "max_age")
    assert refused.exit_code == 1 and "not found" in refused.stderr and client.xlen(keys.inbox) == 2


def test_filters_are_checked(app: Flask) -> None:
    assert dlq(app, "list", "--account", "acme").exit_code == 2
    assert dlq(app, "list", "--status", "teapot").exit_code == 2
    assert "or filters such as --account" in dlq(app, "replay").stderr


# ------------------------------------------------------- an echoed API key, in any encoding

KEY = "ak live/2+x y~" + uuid.uuid4().hex[:12]
ECHOES = {
    "json-escaped": json.dumps({"apiKey": KEY}).replace("/", "\\/"),
    "url %20": "https://partner/cb?k=" + quote(KEY, safe=""),
    "url +": "k=" + quote_plus(KEY),
    "base64, offset 1": base64.b64encode(b"x" + KEY.encode() + b"!").decode(),
    "base64 url-safe, offset 2": base64.urlsafe_b64encode(b"xy" + KEY.encode()).decode(),
    "basic auth": "Basic " + base64.b64encode(b"user:" + KEY.encode()).decode(),
}


@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES.keys())
def test_a_key_the_partner_echoes_encoded_never_reaches_the_letter(
    settings: Settings, client: redis_lib.Redis, keys: Keys, echo: str
) -> None:
    """Through the real path: partner answer -> reference client -> delivery -> dead letter."""
    message = _message(ACCOUNT_A, api_key=KEY)
    attempt_against(settings, Answer(403, f"refused: {echo}"), message, 1)
    letter = dead_letters.get(client, keys, message["id"], ACCOUNT_A)
    assert letter is not None and letter.error is not None and letter.last_status == 403
    assert "[redacted]" in letter.error and echo not in letter.error
    for form in (KEY, json.dumps(KEY)[1:-1], quote(KEY, safe=""), quote_plus(KEY)):
        assert form not in letter.error
