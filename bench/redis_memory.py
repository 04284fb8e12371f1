"""What the dedupe marks cost in Redis memory, for sizing it: `python -m bench.redis_memory`.

Every accepted message leaves a mark (`<prefix>:seen:<id>`) that lives DEDUP_TTL_SECONDS, so a
steady rate keeps rate x TTL marks. This stores COUNT fresh ids with the service's own Lua
script (service/ingest.py), drops the inbox entries they created (workers move those on within
moments), and reads Redis's `used_memory` before and after: bytes per mark, and what that means
at a few rates and TTLs. It empties the database it is given (default: database 10 of
BENCH_REDIS, redis://127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import os
import uuid

import redis

from common.keys import Keys
from service.ingest import _ACCEPT

RATES = (10, 200, 2_000, 10_000)  # messages/s: a small customer, ..., a large one at peak
TTLS = (3_600, 6 * 3_600, 86_400)


def bytes_per_mark(client: redis.Redis, count: int, ttl: int) -> float:
    keys = Keys("fr")
    accept = client.register_script(_ACCEPT)
    client.flushdb()
    before = client.info("memory")["used_memory"]
    pipe = client.pipeline(transaction=False)
    for index in range(count):
        message_id = str(uuid.uuid4())
        accept(
            keys=(keys.seen(message_id), keys.inbox),
            args=(ttl, b"{}", "event_processing_request", message_id),
            client=pipe,
        )
        if index % 2_000 == 1_999:
            pipe.execute()
    pipe.execute()
    client.delete(keys.inbox)
    after = client.info("memory")["used_memory"]
    marks = client.dbsize()
    client.flushdb()
    if marks != count:
        raise SystemExit(f"expected {count} marks, found {marks}")
    return (after - before) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379").rstrip("/") + "/10")
    parser.add_argument("--count", type=int, default=200_000)
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis)
    per_mark = bytes_per_mark(client, max(1_000, min(args.count, 2_000_000)), TTLS[-1])
    version = client.info("server")["redis_version"]
    print(f"Redis {version}: {per_mark:.0f} bytes per dedupe mark ({args.count:,} marks)\n")
    print("| messages/s | " + " | ".join(f"TTL {ttl // 3600} h" for ttl in TTLS) + " |")
    print("| ---: | " + " | ".join("---:" for _ in TTLS) + " |")
    for rate in RATES:
        cells = [_size(rate * ttl * per_mark) for ttl in TTLS]
        print(f"| {rate:,} | " + " | ".join(cells) + " |")
    return 0


def _size(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
