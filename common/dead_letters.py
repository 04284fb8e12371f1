"""The dead-letter store: what could not be delivered, with why, kept in Redis to inspect and replay."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis

from common.keys import Keys
from common.redaction import redact_message


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
) -> DeadLetter:
    """`letter_id`: when the message id is not unique among letters (the units of one split message)."""
    letter = DeadLetter(
        id=letter_id or message_id or str(uuid.uuid4()),
        message_id=message_id,
        account_id=account_id,
        type=message_type,
        reason=reason,
        last_status=last_status,
        error=error,
        attempts=attempts,
        dead_at=time.time(),
        body=body,
    )
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.dead_letters, letter.id, orjson.dumps(asdict(letter)))
    pipe.zadd(keys.dead_letter_index, {letter.id: letter.dead_at})
    pipe.hincrby(keys.stats, "dead_lettered", 1)
    pipe.execute()
    return letter


def _load(raw: bytes | None) -> DeadLetter | None:
    return DeadLetter(**orjson.loads(raw)) if raw else None


def get(client: redis.Redis, keys: Keys, letter_id: str) -> DeadLetter | None:
    return _load(client.hget(keys.dead_letters, letter_id))


def list_letters(client: redis.Redis, keys: Keys, limit: int = 100) -> list[DeadLetter]:
    ids = client.zrange(keys.dead_letter_index, 0, limit - 1)
    if not ids:
        return []
    return [letter for letter in map(_load, client.hmget(keys.dead_letters, ids)) if letter]


def count(client: redis.Redis, keys: Keys) -> int:
    return int(client.zcard(keys.dead_letter_index))


def replay(client: redis.Redis, keys: Keys, letter_id: str) -> bool:
    """Put a dead letter back into the inbox, where it takes the same way as new traffic."""
    letter = get(client, keys, letter_id)
    if letter is None:
        return False
    pipe = client.pipeline(transaction=True)
    pipe.xadd(keys.inbox, {"body": letter.body, "type": letter.type or "", "id": letter.id})
    pipe.hdel(keys.dead_letters, letter_id)
    pipe.zrem(keys.dead_letter_index, letter_id)
    pipe.execute()
    return True


def purge(client: redis.Redis, keys: Keys, letter_id: str | None = None) -> int:
    if letter_id is None:
        removed = count(client, keys)
        client.delete(keys.dead_letters, keys.dead_letter_index)
        return removed
    pipe = client.pipeline(transaction=True)
    pipe.hdel(keys.dead_letters, letter_id)
    pipe.zrem(keys.dead_letter_index, letter_id)
    return int(pipe.execute()[0])
