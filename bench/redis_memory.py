"""What one event message costs Redis for its lifetime, for sizing it: `python -m bench.redis_memory`.

A message's body leaves Redis once delivered (the inbox, lane and Celery entries are deleted as
it moves on); what stays, for DEDUP_TTL_SECONDS, are its marks (common/marks.py: 12-byte digests
in time-bucketed, sharded hashes): the seen mark the web writes when it accepts it and the
delivered mark the gate writes when the partner answers 2xx. So a steady rate keeps rate x TTL of
each, a little longer on average (a bucket's marks all expire together: x (1 + 1 / (2 x
SPANS_PER_TTL)), counted in the figure). This takes COUNT event messages (the 3.2.0 iOS fixture,
fresh ids) through both steps with the service's own code: the web's Lua store (service/ingest.py),
the inbox entries dropped as the pump would, then the delivered mark of each message's real
partner operation (workers/mapping.py), written by the same Lua as the gate's leave step. Before
that, the previous bucket is filled with COUNT marks of each kind through the same code at an
earlier time, so the buckets measured are sharded as a steady rate shards them. It reads Redis's
`used_memory` around each step. It empties the database it is given (default: database 10 of
BENCH_REDIS, redis://127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import os
import uuid

import orjson
import redis

from common.keys import Keys, mark_digest
from common.marks import LUA, SPANS_PER_TTL, span_seconds
from devtools.samples import FIXTURES
from service.ingest import _ACCEPT
from workers.mapping import plan_message

RATES = (10, 200, 2_000, 10_000)  # messages/s: a small customer, ..., a large one at peak
TTLS = (3_600, 6 * 3_600, 86_400)
ACCOUNT_ID = 1234567
# The real mark_add at a chosen time (ARGV[3]): only to fill the bucket before the one measured.
_ADD_AT = LUA + "for i = 4, #ARGV do mark_add(ARGV[1], ARGV[i], tonumber(ARGV[2]), tonumber(ARGV[3])) end return 1"
_ADD_NOW = (
    LUA + "local now = mark_now() for i = 3, #ARGV do mark_add(ARGV[1], ARGV[i], tonumber(ARGV[2]), now) end return 1"
)
LIFETIME = 1 + 1 / (2 * SPANS_PER_TTL)  # average mark life / TTL


def event_bodies(count: int) -> list[bytes]:
    """`count` copies of the 3.2.0 iOS fixture, each with a fresh id, under one account."""
    template = orjson.loads((FIXTURES / "3.2.0" / "EventProcessingRequest_ios.json").read_bytes())
    template["account"]["account_id"] = ACCOUNT_ID
    return [orjson.dumps(dict(template, id=str(uuid.uuid4()))) for _ in range(count)]


def _previous_bucket(client: redis.Redis, keys: Keys, count: int, ttl: int) -> None:
    add_at = client.register_script(_ADD_AT)
    earlier = int(client.time()[0]) - span_seconds(ttl)
    for ns in (keys.seen_marks, keys.delivered_marks):
        for start in range(0, count, 2_000):
            digests = [mark_digest("earlier", ns, n) for n in range(start, min(count, start + 2_000))]
            add_at(args=[ns, ttl, earlier, *digests])


def bytes_per_message(client: redis.Redis, count: int, ttl: int) -> tuple[float, float]:
    """(seen mark, delivered mark) bytes per message, from used_memory around each step."""
    keys = Keys("fr")
    accept = client.register_script(_ACCEPT)
    add_now = client.register_script(_ADD_NOW)
    bodies = event_bodies(count)
    marks = [plan_message(orjson.loads(body)).operations[0].idempotency_key() for body in bodies]
    client.flushdb()
    _previous_bucket(client, keys, count, ttl)
    keys_before = client.dbsize()
    before = client.info("memory")["used_memory"]
    pipe = client.pipeline(transaction=False)
    for index, body in enumerate(bodies):
        message_id = orjson.loads(body)["id"]
        accept(
            keys=(keys.inbox,),
            args=(
                ttl,
                body,
                "event_processing_request",
                message_id,
                "",
                mark_digest(ACCOUNT_ID, message_id),
                keys.seen_marks,
            ),
            client=pipe,
        )
        if index % 2_000 == 1_999:
            pipe.execute()
    pipe.execute()
    client.delete(keys.inbox)  # delivered messages leave the inbox, lanes and Celery's queue
    accepted = client.info("memory")["used_memory"]
    for start in range(0, count, 2_000):
        add_now(args=[keys.delivered_marks, ttl, *(mark_digest(m) for m in marks[start : start + 2_000])])
    delivered = client.info("memory")["used_memory"]
    found = sum(client.hlen(k) for k in client.scan_iter(match="fr:[sd]:*:*:*", count=1_000))
    client.flushdb()
    if found != 4 * count:
        raise SystemExit(f"expected {4 * count} marks, found {found} ({keys_before} keys before)")
    return (accepted - before) / count, (delivered - accepted) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379").rstrip("/") + "/10")
    parser.add_argument("--count", type=int, default=50_000)
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis)
    count = max(1_000, min(args.count, 1_000_000))
    seen, delivered = bytes_per_message(client, count, TTLS[-1])
    per_message = (seen + delivered) * LIFETIME
    version = client.info("server")["redis_version"]
    print(
        f"Redis {version}: {per_message:.0f} bytes per accepted and delivered event message for its "
        f"lifetime (seen mark {seen:.0f} + delivered mark {delivered:.0f}, x {LIFETIME} for bucketed "
        f"expiry; {count:,} messages)\n"
    )
    print("| messages/s | " + " | ".join(f"TTL {ttl // 3600} h" for ttl in TTLS) + " |")
    print("| ---: | " + " | ".join("---:" for _ in TTLS) + " |")
    for rate in RATES:
        cells = [_size(rate * ttl * per_message) for ttl in TTLS]
        print(f"| {rate:,} | " + " | ".join(cells) + " |")
    return 0


def _size(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
