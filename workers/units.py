"""Big messages as independent units of work: one unit per partner operation.

A membership change for many audiences maps to one MEMBERS operation per audience. Sent in one
task, 750 audiences are 750 calls in a row and one failing audience retries them all. Instead,
the first attempt at a message whose plan has more than one operation *splits* it: every
operation not yet delivered becomes a unit, an entry of type `unit` in its API key's lane (the
pump's, workers/pump.py) whose body is the
operation itself (already mapped, so never validated again). A unit travels like any message
(`firehose.deliver`), is one partner call under the operation's own idempotency key, and is
retried, deferred and dead-lettered on its own, under the original message's id and type.

Plain functions (encoding, decoding, the split decision) plus the one Redis step that stores the
units, in chunks (`store_units`). Imports nothing of delivery or tasks: both import this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from common.keys import Keys, partner_key
from common.names import INBOX_GROUP
from workers.grouping import UNIT
from workers.mapping import API_KEY_SETTING
from workers.partner.base import Operation, OperationKind

# The version of the unit body's shape. A body starts with it (the first key orjson writes), which
# is what `is_unit_body` looks at.
UNIT_VERSION = 1
_BODY_PREFIX = '{"unit":'

# Delivery counters (fr:stats:delivery) the split step adds to (named again in _STORE_UNITS).
SPLIT_COUNTER = "split"  # messages split into units
UNITS_COUNTER = "units"  # units written by splits


class UnitInvalid(ValueError):
    """A body that claims to be a unit but is not one we could have written."""


@dataclass(frozen=True)
class Unit:
    """One operation of an accepted message, with what logs and dead letters need of the message."""

    operation: Operation
    message_id: str | None
    account_id: int | None
    message_type: str | None


@dataclass(frozen=True)
class UnitEntry:
    """The stream fields a unit is stored with in its lane (besides type, attempt, first_seen)."""

    body: str
    id: str  # the Celery task id and the dead-letter id: unique per unit, stable across re-runs
    lane: str  # the hash of the unit's API key, for the pump's per-API-key lanes


def should_split(operations: Sequence[Operation]) -> bool:
    """More than one partner call left: each becomes a unit of its own.

    One operation is sent in place: the common case pays no extra hop through the inbox. Event
    batches never get here as several operations (a message has at most one; a group of them is
    one call, and `run_attempt` never splits a group).
    """
    return len(operations) > 1 and all(op.kind is not OperationKind.EVENTS for op in operations)


def unit_id(operation: Operation) -> str:
    """The original message's id and the start of the operation's idempotency key.

    Unique among the units of a message (two units dead-lettered under the bare message id would
    overwrite each other), and the same every time the same work is split again.
    """
    return f"{operation.message_id or 'unit'}:{operation.idempotency_key()[:16]}"


def encode(operation: Operation, *, account_id: int | None, message_type: str | None) -> str:
    """The unit's body. orjson keeps the key order written here, so "unit" comes first."""
    return orjson.dumps(
        {
            "unit": UNIT_VERSION,
            "kind": str(operation.kind),
            "audience_id": operation.audience_id,
            "message_id": operation.message_id,
            "message_type": message_type,
            # In the message's own shape: redaction (common/redaction.py) hides account_settings
            # wherever a body is shown (`flask dlq show`), and whatever finds a message's API key
            # in its body (the pump's lanes, for a retried unit without a `lane` field) finds it.
            "account": {"account_id": account_id, "account_settings": {API_KEY_SETTING: operation.api_key}},
            "payload": operation.payload,
        }
    ).decode()


def entries(operations: Sequence[Operation], *, account_id: int | None, message_type: str | None) -> list[UnitEntry]:
    return [
        UnitEntry(encode(op, account_id=account_id, message_type=message_type), unit_id(op), partner_key(op.api_key))
        for op in operations
    ]


def is_unit(message: Any) -> bool:
    """A parsed body is a unit: it has "unit" and, unlike every Firehose message, no "type".

    Only the split writes such bodies into the inbox: the web's envelope check refuses a body
    without a type, so nothing from outside can pass for a unit.
    """
    return isinstance(message, dict) and "unit" in message and "type" not in message


def is_unit_body(body: str) -> bool:
    """Without parsing: units are only written by `encode` and replayed byte for byte."""
    return body.startswith(_BODY_PREFIX)


def _optional(message: dict[str, Any], name: str, kind: type) -> Any:
    value = message.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise UnitInvalid(f"unit {name} must be a {kind.__name__} or null")
    return value


def decode(message: Any) -> Unit:
    """The unit a parsed unit body holds; raises UnitInvalid."""
    if not is_unit(message):
        raise UnitInvalid("not a unit")
    if message.get("unit") != UNIT_VERSION:
        raise UnitInvalid(f"unsupported unit version {message.get('unit')!r}")
    try:
        kind = OperationKind(message.get("kind"))
    except ValueError:
        raise UnitInvalid(f"unknown operation kind {str(message.get('kind'))[:40]!r}") from None
    account = message.get("account")
    if not isinstance(account, dict):
        raise UnitInvalid("unit account must be an object")
    settings = account.get("account_settings")
    api_key = settings.get(API_KEY_SETTING) if isinstance(settings, dict) else None
    payload = message.get("payload")
    if not isinstance(api_key, str) or not api_key:
        raise UnitInvalid("unit has no account.account_settings.apiKey")
    if not isinstance(payload, dict):
        raise UnitInvalid("unit payload must be an object")
    operation = Operation(
        kind,
        payload,
        api_key,
        _optional(message, "audience_id", int),
        _optional(message, "message_id", str),
    )
    return Unit(
        operation,
        operation.message_id,
        _optional(account, "account_id", int),
        _optional(message, "message_type", str),
    )


def identify(message: Any) -> tuple[str | None, int | None, str | None]:
    """(message id, account id, type) of a unit, as far as it has them: for a unit that is rejected."""

    def field(holder: Any, name: str, kind: type) -> Any:
        value = holder.get(name) if isinstance(holder, dict) else None
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    account = message.get("account") if isinstance(message, dict) else None
    return field(message, "message_id", str), field(account, "account_id", int), field(message, "message_type", str)


def split_mark_id(message_id: str | None, body: str) -> str:
    """What the split mark is keyed by: the message id, or (a message without one) its body's hash."""
    return message_id or hashlib.sha256(body.encode()).hexdigest()[:32]


# Units are written in chunks, each one atomic step: the chunk's split mark (SET NX) and its
# units' XADDs happen together or not at all. A re-run of the splitting task (it died after a
# step and before its ack) finds the marks of the chunks it wrote and writes only the rest. A
# chunk's mark is named by its units' ids: were the list to differ on a re-run (some units
# delivered meanwhile), the new chunks are written again, and their twins are harmless (same
# idempotency keys: the gate finds them delivered), where skipping one would lose units.
# Chunks bound the time one script holds Redis: a 75,000-audience change written in one step
# would stall every other client, the web's 2xx path first.
# The units go straight into their lane (every unit of a message has its API key's), created
# with its consumer group if need be: through the inbox they would queue behind other keys'
# backlog. KEYS: the chunk's split mark, the lanes set, stats. ARGV: mark TTL, entry type,
# first_seen, consumer group, lane key prefix, whether this is the first chunk, then body, id,
# lane for each unit.
_STORE_UNITS = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return -1
end
local ready = {}
local n = 0
for i = 7, #ARGV, 3 do
  local lane = ARGV[i + 2]
  local key = ARGV[5] .. lane
  if not ready[key] then
    redis.pcall('XGROUP', 'CREATE', key, ARGV[4], '0', 'MKSTREAM')
    redis.call('SADD', KEYS[2], lane)
    ready[key] = true
  end
  redis.call('XADD', key, '*', 'body', ARGV[i], 'type', ARGV[2], 'id', ARGV[i + 1],
             'attempt', '1', 'first_seen', ARGV[3], 'lane', lane)
  n = n + 1
end
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[3], 'split', 1) end
redis.call('HINCRBY', KEYS[3], 'units', n)
return n
"""

# Units written by one script call.
UNITS_PER_STEP = 500


def store_units(
    client: redis.Redis, keys: Keys, mark_id: str, units: Sequence[UnitEntry], *, first_seen_ms: int, mark_ttl: int
) -> int | None:
    """Write the units into their lane with attempt 1 and the message's first_seen (its maximum
    age still counts from acceptance). Returns how many were written, None when every chunk's
    split mark said it was written before (nothing written now)."""
    script = client.register_script(_STORE_UNITS)
    written: int | None = None
    for start in range(0, len(units), UNITS_PER_STEP):
        chunk = units[start : start + UNITS_PER_STEP]
        chunk_id = hashlib.sha256("\n".join(unit.id for unit in chunk).encode()).hexdigest()[:16]
        args: list[str | int] = [mark_ttl, UNIT, first_seen_ms, INBOX_GROUP, keys.lane_prefix, int(start == 0)]
        for unit in chunk:
            args += [unit.body, unit.id, unit.lane]
        n = int(script(keys=[keys.split(f"{mark_id}:{chunk_id}"), keys.lanes, keys.stats], args=args))
        if n >= 0:
            written = (written or 0) + n
    return written
