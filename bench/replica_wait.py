"""What REDIS_MIN_REPLICAS=1 costs the request path: `python -m bench.replica_wait [--count N]`.

Starts a private primary and one replica (redis-server on free loopback ports), builds two apps
on the primary, one with REDIS_MIN_REPLICAS=0 and one with 1, and times the service's own store
(`Ingest.accept`, the whole Redis round trip the door makes) for the same event message with
fresh ids, the two alternating call by call so both see the same machine. Prints p50, p99 and
max of each in ms. Nothing of anyone else's Redis is touched.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from common.config import Settings
from devtools.procs import wait_for
from devtools.redis_server import RedisServer
from devtools.samples import FIXTURES
from service import create_app
from service.ingest import app_ingest


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5_000)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-wait-"))
    primary = RedisServer(root, root, name="bench-primary")
    replica_dir = root / "replica"
    replica_dir.mkdir()
    replica = RedisServer(replica_dir, root, name="bench-replica", replica_of=primary)
    primary.start()
    replica.start()
    try:
        base = Settings(redis_url=primary.url, broker_url=primary.url, auth_tokens=("bench",))
        ingests = {
            n: app_ingest(
                create_app(base.model_copy(update={"redis_min_replicas": n, "ingest_redis_timeout_ms": 1000}))
            )
            for n in (0, 1)
        }
        wait_for(lambda: ingests[1].client.execute_command("WAIT", 1, 100) >= 1, 20, what="the replica")
        template = orjson.loads((FIXTURES / "3.2.0" / "EventProcessingRequest_ios.json").read_bytes())
        times: dict[int, list[float]] = {0: [], 1: []}
        for index in range(args.count * 2):
            n = index % 2
            body = orjson.dumps(dict(template, id=str(uuid.uuid4())))
            started = time.perf_counter()
            ingests[n].accept(None, "event_processing_request", body, 1)
            times[n].append((time.perf_counter() - started) * 1000)
        for n, values in times.items():
            print(
                f"REDIS_MIN_REPLICAS={n}: p50 {statistics.median(values):.3f} ms, "
                f"p99 {_percentile(values, 0.99):.3f} ms, max {max(values):.3f} ms ({len(values):,} stores)"
            )
    finally:
        replica.stop()
        primary.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
