"""`flask dlq list/replay` by filter, through the real `flask` command (a subprocess, its stderr on a
pseudo-terminal for the progress bar) and, for the memory bound, Flask's CLI runner in this process
under tracemalloc; all against the suite's private Redis, under a key prefix per test."""

from __future__ import annotations

import os
import pty
import subprocess
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis as redis_lib

from common import dead_letters
from common.config import Settings
from common.keys import Keys
from service import create_app
from tests.support import BIN, ROOT, base_env

ACCOUNT_A, ACCOUNT_B = 7001, 7002


@pytest.fixture
def prefix() -> str:
    return f"dlq{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(redis_client: redis_lib.Redis, prefix: str) -> Iterator[tuple[redis_lib.Redis, Keys]]:
    keys = Keys(prefix)
    yield redis_client, keys
    for key in redis_client.scan_iter(f"{prefix}:*", count=1000):
        redis_client.delete(key)


def _body(account_id: int, message_id: str, pad: int = 0) -> str:
    return orjson.dumps(
        {
            "type": "event_processing_request",
            "id": message_id,
            "timestamp_ms": 1,
            "account": {"account_id": account_id, "account_settings": {"apiKey": "ak-" + "k" * 20}},
            "events": [{"event_type": "custom_event", "data": {"event_name": "x" * pad}}],
        }
    ).decode()


def _add(client: redis_lib.Redis, keys: Keys, account_id: int, pad: int = 0) -> dead_letters.DeadLetter:
    message_id = str(uuid.uuid4())
    return dead_letters.add(
        client,
        keys,
        _body(account_id, message_id, pad),
        reason="partner_rejected",
        message_id=message_id,
        account_id=account_id,
        message_type="event_processing_request",
        last_status=400,
        attempts=1,
    )


def _flask(redis_url: str, prefix: str, *args: str, stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = base_env(redis_url, REDIS_KEY_PREFIX=prefix)
    return subprocess.run(
        [str(BIN / "flask"), "--app", "service:create_app", "dlq", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=60,
    )


def test_a_dry_run_by_account_lists_only_that_accounts_letters(
    store: tuple[redis_lib.Redis, Keys], redis_url: str, prefix: str
) -> None:
    client, keys = store
    mine = [_add(client, keys, ACCOUNT_A) for _ in range(3)]
    theirs = [_add(client, keys, ACCOUNT_B) for _ in range(4)]

    dry = _flask(redis_url, prefix, "replay", "--account", str(ACCOUNT_A), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [x.id for x in mine]
    assert all(f"account={ACCOUNT_A}" in line and " expires=20" in line for line in lines)
    assert dry.stderr == "would replay 3 (dry run: nothing replayed)\n"
    assert client.xlen(keys.inbox) == 0 and dead_letters.count(client, keys) == 7

    listed = _flask(redis_url, prefix, "list", "--json", "--account", str(ACCOUNT_B))
    assert [orjson.loads(line)["id"] for line in listed.stdout.splitlines()] == [x.id for x in theirs]

    done = _flask(redis_url, prefix, "replay", "--account", str(ACCOUNT_A))
    assert (done.returncode, done.stdout, done.stderr) == (0, "replayed 3\n", "")  # no bar: not a terminal
    assert [f[b"id"].decode() for _, f in client.xrange(keys.inbox)] == [x.id for x in mine]
    assert [x.id for x in dead_letters.list_letters(client, keys)] == [x.id for x in theirs]


def test_a_replay_on_a_terminal_shows_a_progress_bar(
    store: tuple[redis_lib.Redis, Keys], redis_url: str, prefix: str
) -> None:
    client, keys = store
    for _ in range(1200):  # a few pages
        _add(client, keys, ACCOUNT_B)
    leader, follower = pty.openpty()
    try:
        done = _flask(redis_url, prefix, "replay", "--all", stderr=follower)
        os.close(follower)
        follower = -1
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other end is closed and drained
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert (done.returncode, done.stdout) == (0, "replayed 1200\n")
    assert b"replaying" in terminal and b"1200/1200" in terminal and b"100%" in terminal
    assert client.xlen(keys.inbox) == 1200


def _replay_peak(client: redis_lib.Redis, keys: Keys, settings: Settings, letters: int) -> tuple[int, int]:
    """(peak bytes this process allocated replaying `letters` letters, the letters' bytes in all)."""
    total = sum(len(_add(client, keys, ACCOUNT_A + n % 2, pad=900).body) for n in range(letters))
    runner = create_app(settings).test_cli_runner()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = runner.invoke(args=["dlq", "replay", "--all"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (result.exit_code, result.stdout) == (0, f"replayed {letters}\n"), result.output
    assert client.xlen(keys.inbox) == letters and dead_letters.count(client, keys) == 0
    return peak, total


def test_a_replay_of_20000_letters_holds_no_more_than_one_of_2000(redis_url: str) -> None:
    client = redis_lib.Redis.from_url(redis_url)
    peaks = {}
    try:
        for letters in (2_000, 20_000):
            keys = Keys(f"dlqmem{uuid.uuid4().hex[:8]}")
            settings = Settings(redis_url=redis_url, broker_url=redis_url, key_prefix=keys.prefix)
            try:
                peaks[letters] = _replay_peak(client, keys, settings, letters)
            finally:
                client.delete(keys.inbox, keys.stats, keys.dead_letter_index)
    finally:
        client.close()
    (small, _), (large, total) = peaks[2_000], peaks[20_000]
    # Ten times the letters, not ten times the memory: pages, never the whole store at once.
    print(f"replay peaks (peak bytes, letter bytes): {peaks}")
    assert large < 1.5 * small, peaks
    # And a small share of what the letters hold (bodies stay in Redis).
    assert large < total / 10, peaks
