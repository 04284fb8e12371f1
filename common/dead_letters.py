"""The dead-letter store: what could not be delivered, with why, kept in Redis to inspect and replay.

Layout (prefix `REDIS_KEY_PREFIX`):

* `fr:dlq:letter:<account>:<id>`, a hash per letter: `meta` (the summary, JSON) and `body`. It
  expires `DLQ_RETENTION_SECONDS` after the letter died. Keyed by account *and* id: message ids
  are the sender's, so two accounts may use one, and one's letter must never overwrite the
  other's. `<account>` is `-` for a letter whose body named none.
* `fr:dlq:index`, a sorted set of `<account>:<id>` by the time the letter died: the order, and
  ranged, paged reads (`scan`) that never hold more than a page. An entry whose letter has
  expired is removed by the next add or read; `count` never counts one.

The body is kept apart from the summary so listing, filtering and a dry run read summaries only,
and a replay moves each body from the letter into the inbox inside Redis (one Lua call per
page), so no replay, however large, holds bodies in this process.

Letters written by the previous layout (one hash `fr:dlq` of JSON letters, indexed by id) are
moved into this one, expiry included, by `migrate_legacy`, which every reader calls first.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from types import EllipsisType
from typing import Any

import orjson
import redis

from common.keys import Keys
from common.redaction import message_secrets, redact_message, redact_secrets

# As DLQ_RETENTION_SECONDS's default; writers pass the setting.
DEFAULT_RETENTION_SECONDS = 14 * 86400
# Index entries read per round trip: bounds what a scan holds whatever the store's size.
PAGE = 500
NO_ACCOUNT = "-"


@dataclass
class DeadLetter:
    id: str
    message_id: str | None
    account_id: int | None
    type: str | None
    reason: str
    last_status: int | None
    error: str | None
    attempts: int
    dead_at: float
    body: str
    expires_at: float | None = None

    @property
    def ref(self) -> str:
        """The letter's name in the store: unique across accounts, unlike `id`."""
        return ref_of(self.account_id, self.id)

    def summary(self) -> dict[str, Any]:
        """Everything but the body, which holds the customer's settings and personal data."""
        out = asdict(self)
        out.pop("body")
        return out

    def redacted_message(self) -> Any:
        try:
            # Deep enough for any real message, shallow enough for any JSON encoder to print.
            return redact_message(orjson.loads(self.body), max_depth=64)
        except orjson.JSONDecodeError:
            return None


_FIELDS = frozenset(f.name for f in fields(DeadLetter))


class AmbiguousLetter(LookupError):
    """More than one account has a dead letter with this id: name the account."""

    def __init__(self, letter_id: str, accounts: list[int | None]) -> None:
        self.letter_id, self.accounts = letter_id, accounts
        named = ", ".join(NO_ACCOUNT if a is None else str(a) for a in accounts)
        super().__init__(
            f"{len(accounts)} dead letters have id {letter_id} (accounts {named}): name one with --account"
        )


@dataclass(frozen=True)
class Filter:
    """Which letters a listing or replay takes; an empty set or None takes any.

    `since` is inclusive and `until` exclusive (epoch seconds of the letter's death).
    A status of None stands for letters that got no answer at all.
    """

    accounts: frozenset[int] = field(default_factory=frozenset)
    reasons: frozenset[str] = field(default_factory=frozenset)
    statuses: frozenset[int | None] = field(default_factory=frozenset)
    types: frozenset[str] = field(default_factory=frozenset)
    since: float | None = None
    until: float | None = None

    def matches(self, letter: DeadLetter) -> bool:
        return (
            (not self.accounts or letter.account_id in self.accounts)
            and (not self.reasons or letter.reason in self.reasons)
            and (not self.statuses or letter.last_status in self.statuses)
            and (not self.types or letter.type in self.types)
        )

    @property
    def is_everything(self) -> bool:
        return self == Filter()


EVERYTHING = Filter()


def ref_of(account_id: int | None, letter_id: str) -> str:
    return f"{NO_ACCOUNT if account_id is None else account_id}:{letter_id}"


def _letter_key(keys: Keys, ref: str) -> str:
    return f"{keys.dead_letters}:letter:{ref}"


def _live_from(retention_seconds: int | None = None, now: float | None = None) -> float:
    return (time.time() if now is None else now) - (retention_seconds or DEFAULT_RETENTION_SECONDS)


def add(
    client: redis.Redis,
    keys: Keys,
    body: str,
    *,
    reason: str,
    message_id: str | None,
    account_id: int | None,
    message_type: str | None,
    last_status: int | None = None,
    error: str | None = None,
    attempts: int = 0,
    letter_id: str | None = None,
    retention_seconds: int = DEFAULT_RETENTION_SECONDS,
) -> DeadLetter:
    """`letter_id`: when the message id is not unique among letters (the units of one split message).

    The error text is the partner's answer and may quote the message's API key in any encoding
    (JSON-escaped, URL-encoded, base64): every settings value of the body is redacted from it.
    """
    dead_at = time.time()
    letter = DeadLetter(
        id=letter_id or message_id or str(uuid.uuid4()),
        message_id=message_id,
        account_id=account_id,
        type=message_type,
        reason=reason,
        last_status=last_status,
        error=None if error is None else redact_secrets(error, _body_secrets(body)),
        attempts=attempts,
        dead_at=dead_at,
        body=body,
        expires_at=dead_at + retention_seconds,
    )
    _write(client, keys, letter, retention_seconds, count=True)
    return letter


def _body_secrets(body: str) -> set[str]:
    try:
        return message_secrets(orjson.loads(body))
    except orjson.JSONDecodeError:
        return set()


def _write(client: redis.Redis, keys: Keys, letter: DeadLetter, retention_seconds: int, *, count: bool) -> None:
    key = _letter_key(keys, letter.ref)
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping={"meta": orjson.dumps(letter.summary()), "body": letter.body})
    pipe.pexpireat(key, math.ceil((letter.expires_at or letter.dead_at + retention_seconds) * 1000))
    pipe.zadd(keys.dead_letter_index, {letter.ref: letter.dead_at})
    # Expired letters leave the index here, so it never grows past what is kept.
    pipe.zremrangebyscore(keys.dead_letter_index, "-inf", f"({_live_from(retention_seconds)!r}")
    # And an index no letter was added to for a whole retention period goes with its letters.
    pipe.expire(keys.dead_letter_index, retention_seconds, gt=True)
    pipe.expire(keys.dead_letter_index, retention_seconds, nx=True)
    if count:
        pipe.hincrby(keys.stats, "dead_lettered", 1)
    pipe.execute()


def _trim(client: redis.Redis, keys: Keys, retention_seconds: int | None) -> None:
    client.zremrangebyscore(keys.dead_letter_index, "-inf", f"({_live_from(retention_seconds)!r}")


def _load(meta: bytes | None, body: bytes | None) -> DeadLetter | None:
    if meta is None:
        return None
    values = {k: v for k, v in orjson.loads(meta).items() if k in _FIELDS}
    return DeadLetter(**values, body=(body or b"").decode())


def _summaries(client: redis.Redis, keys: Keys, refs: list[bytes]) -> list[tuple[bytes, DeadLetter | None]]:
    pipe = client.pipeline(transaction=False)
    for ref in refs:
        pipe.hget(_letter_key(keys, ref.decode()), "meta")
    # The body is left in Redis: a summary is all a listing, a filter or a replay needs here.
    return [(ref, _load(meta, None)) for ref, meta in zip(refs, pipe.execute(), strict=True)]


def migrate_legacy(client: redis.Redis, keys: Keys, retention_seconds: int = DEFAULT_RETENTION_SECONDS) -> int:
    """Moves letters of the previous layout (a hash of JSON letters under `fr:dlq`) into this one.

    Each keeps its time of death, so it expires when it would have; one already past the
    retention is dropped. Safe to run from several processes at once: each field is moved
    and deleted in one transaction, and a second mover finds it gone.
    """
    if client.type(keys.dead_letters) != b"hash":
        return 0
    moved = 0
    for letter_id, raw in client.hscan_iter(keys.dead_letters, count=PAGE):
        letter = DeadLetter(**{k: v for k, v in orjson.loads(raw).items() if k in _FIELDS})
        letter.expires_at = letter.dead_at + retention_seconds
        pipe = client.pipeline(transaction=True)
        pipe.hdel(keys.dead_letters, letter_id)
        pipe.zrem(keys.dead_letter_index, letter_id)
        if pipe.execute()[0] and letter.expires_at > time.time():
            _write(client, keys, letter, retention_seconds, count=False)
            moved += 1
    return moved


def get(
    client: redis.Redis, keys: Keys, letter_id: str, account_id: int | EllipsisType | None = ...
) -> DeadLetter | None:
    """The letter `letter_id` of `account_id` (`None`: a letter that named no account).

    Without an account, the one letter with that id, whichever account it is of; `letter_id`
    may be a ref (`<account>:<id>`) too. AmbiguousLetter when several accounts have one.
    """
    migrate_legacy(client, keys)
    if account_id is not ...:
        return _get_ref(client, keys, ref_of(account_id, letter_id))
    found = find(client, keys, letter_id)
    if len(found) > 1:
        raise AmbiguousLetter(letter_id, [letter.account_id for letter in found])
    return found[0] if found else None


def _get_ref(client: redis.Redis, keys: Keys, ref: str) -> DeadLetter | None:
    meta, body = client.hmget(_letter_key(keys, ref), ["meta", "body"])
    return _load(meta, body)


def find(client: redis.Redis, keys: Keys, letter_id: str) -> list[DeadLetter]:
    """Every letter named `letter_id`, as a ref or as an id of any account.

    A walk of the index (ZSCAN), for the CLI's convenience when the account is not given.
    """
    exact = _get_ref(client, keys, letter_id)
    pattern = "*:" + "".join("\\" + c if c in "*?[]\\" else c for c in letter_id)
    refs = {ref for ref, _ in client.zscan_iter(keys.dead_letter_index, match=pattern, count=PAGE)}
    found = [exact] if exact else []
    for ref in sorted(refs):
        letter = _get_ref(client, keys, ref.decode())
        if letter is not None and letter.id == letter_id and (exact is None or letter.ref != exact.ref):
            found.append(letter)
    return found


def scan(
    client: redis.Redis,
    keys: Keys,
    which: Filter = EVERYTHING,
    *,
    retention_seconds: int = DEFAULT_RETENTION_SECONDS,
    page: int = PAGE,
    until: float | None = None,
    progress: Any = None,
) -> Iterator[DeadLetter]:
    """The letters `which` takes, oldest first, read `page` index entries at a time; bodies not loaded.

    Letters added after the scan began are not reached (nor any after `until`): a replay
    whose letters die again as it goes must not come round to them. `progress(n)` is called with
    the number of index entries each page covered.
    """
    migrate_legacy(client, keys, retention_seconds)
    _trim(client, keys, retention_seconds)
    low = max(which.since if which.since is not None else -math.inf, _live_from(retention_seconds))
    high = f"({min(t for t in (which.until, until, time.time()) if t is not None)!r}"
    cursor: tuple[float, bytes] | None = None
    while True:
        rows = _index_page(client, keys, low, high, cursor, page)
        if not rows:
            return
        cursor = (rows[-1][1], rows[-1][0])
        stale: list[bytes] = []
        for ref, letter in _summaries(client, keys, [ref for ref, _ in rows]):
            if letter is None:
                stale.append(ref)
            elif which.matches(letter):
                yield letter
        if stale:
            # Expired (or replayed meanwhile); ZREM of what a concurrent replay took is harmless.
            client.zrem(keys.dead_letter_index, *stale)
        if progress is not None:
            progress(len(rows))


def _index_page(
    client: redis.Redis, keys: Keys, low: float, high: str, cursor: tuple[float, bytes] | None, page: int
) -> list[tuple[bytes, float]]:
    """The next `page` index entries after `cursor` (score, member): Redis orders equal scores by member.

    A cursor, not an offset, because a replay removes what it read and letters expire: offsets
    would shift and skip entries.
    """
    if cursor is None:
        return client.zrangebyscore(keys.dead_letter_index, repr(low), high, start=0, num=page, withscores=True)
    score, member = cursor
    # One more than a page: the first row is usually the cursor's own entry, read again.
    rows = client.zrangebyscore(keys.dead_letter_index, repr(score), high, start=0, num=page + 1, withscores=True)
    after = [(m, s) for m, s in rows if (s, m) > cursor]
    if after or len(rows) <= page:
        return after[:page]
    # A whole page at the cursor's very score (never seen in practice): take all of that score.
    ties = client.zrangebyscore(keys.dead_letter_index, repr(score), repr(score), withscores=True)
    after = [(m, s) for m, s in ties if m > member]
    return after or client.zrangebyscore(
        keys.dead_letter_index, f"({score!r}", high, start=0, num=page, withscores=True
    )


def span(client: redis.Redis, keys: Keys, which: Filter = EVERYTHING, retention_seconds: int | None = None) -> int:
    """How many index entries a scan with `which` walks: the length of a progress bar."""
    low = max(which.since if which.since is not None else -math.inf, _live_from(retention_seconds))
    high = "+inf" if which.until is None else f"({which.until!r}"
    return int(client.zcount(keys.dead_letter_index, repr(low), high))


def list_letters(
    client: redis.Redis,
    keys: Keys,
    limit: int = 100,
    which: Filter = EVERYTHING,
    retention_seconds: int = DEFAULT_RETENTION_SECONDS,
) -> list[DeadLetter]:
    """The first `limit` letters `which` takes, oldest first, with their bodies."""
    out: list[DeadLetter] = []
    if limit <= 0:
        return out
    for letter in scan(client, keys, which, retention_seconds=retention_seconds, page=min(PAGE, max(limit, 1))):
        full = _get_ref(client, keys, letter.ref)
        if full is not None:
            out.append(full)
        if len(out) >= limit:
            break
    return out


def count(client: redis.Redis, keys: Keys, retention_seconds: int | None = None) -> int:
    """Letters kept now: the index's entries younger than the retention (expired ones may linger)."""
    return span(client, keys, EVERYTHING, retention_seconds)


# Replays a page of letters atomically, each at most once even if two replays race: a letter
# goes into the inbox only if this call is the one that deletes it. The body is read here, in
# Redis, and never travels to the client. KEYS: inbox, index, then each letter's key.
# ARGV: per letter, its ref, id and type.
_REPLAY_LUA = """
local replayed = 0
for i = 3, #KEYS do
  local j = (i - 3) * 3
  local body = redis.call('HGET', KEYS[i], 'body')
  redis.call('ZREM', KEYS[2], ARGV[j + 1])
  if body and redis.call('DEL', KEYS[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'body', body, 'type', ARGV[j + 3], 'id', ARGV[j + 2])
    replayed = replayed + 1
  end
end
return replayed
"""


def replay_letters(client: redis.Redis, keys: Keys, letters: Iterable[DeadLetter]) -> int:
    """Puts letters back into the inbox, where they take the same way as new traffic; how many were there."""
    batch = list(letters)
    if not batch:
        return 0
    letter_keys = [_letter_key(keys, letter.ref) for letter in batch]
    argv = [value for letter in batch for value in (letter.ref, letter.id, letter.type or "")]
    return int(client.eval(_REPLAY_LUA, 2 + len(batch), keys.inbox, keys.dead_letter_index, *letter_keys, *argv))


def replay(client: redis.Redis, keys: Keys, letter_id: str, account_id: int | EllipsisType | None = ...) -> bool:
    """Put one dead letter back into the inbox (see `get` for how it is named)."""
    letter = get(client, keys, letter_id, account_id)
    return letter is not None and replay_letters(client, keys, [letter]) == 1


def delete_letters(client: redis.Redis, keys: Keys, letters: Iterable[DeadLetter]) -> int:
    batch = list(letters)
    if not batch:
        return 0
    pipe = client.pipeline(transaction=True)
    pipe.delete(*(_letter_key(keys, letter.ref) for letter in batch))
    pipe.zrem(keys.dead_letter_index, *(letter.ref for letter in batch))
    return int(pipe.execute()[0])


def purge(
    client: redis.Redis, keys: Keys, letter_id: str | None = None, account_id: int | EllipsisType | None = ...
) -> int:
    """Deletes one letter (named as for `get`), or every one when no id is given."""
    if letter_id is not None:
        letter = get(client, keys, letter_id, account_id)
        return 0 if letter is None else delete_letters(client, keys, [letter])
    removed = 0
    page: list[DeadLetter] = []
    for letter in scan(client, keys):
        page.append(letter)
        if len(page) >= PAGE:
            removed += delete_letters(client, keys, page)
            page = []
    return removed + delete_letters(client, keys, page)
