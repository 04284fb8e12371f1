"""Delivery under a flaky partner: the stub fails a share of calls at random, and we count.

Starts the partner stub, gunicorn and Celery workers on loopback against a Redis database of
its own, posts N event batches through the real endpoint, waits (bounded) until nothing is
left in flight, and reports what mParticle was told and what the partner got:

    .venv/bin/python -m bench.fault_run --messages 500 --failure-rate 0.3

Every network call goes to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import redis
import requests

from common.keys import Keys
from common.names import DELIVERY_QUEUE
from devtools.procs import start_stub, start_web, start_worker, wait_for

TOKEN = "fault-run-token"
API_KEY = "fault-run-key"


def event_batch(index: int) -> dict:
    return {
        "type": "event_processing_request",
        "id": str(uuid.uuid4()),
        "timestamp_ms": int(time.time() * 1000),
        "firehose_version": "3.2.0",
        "account": {"account_id": 4242, "account_settings": {"apiKey": API_KEY}},
        "mpid": str(-(10**18) - index),
        "events": [
            {
                "type": "custom_event",
                "id": str(uuid.uuid4()),
                "timestamp_ms": 1,
                "name": "e",
                "custom_event_type": "other",
            },
            {"type": "screen_view", "id": str(uuid.uuid4()), "timestamp_ms": 2, "screen_name": "s"},
        ],
    }


def drained(client: redis.Redis, keys: Keys) -> bool:
    return (
        client.xlen(keys.inbox) == 0
        and client.zcard(keys.retry_schedule) == 0
        and client.llen(DELIVERY_QUEUE) == 0
        and client.hlen("unacked") == 0
    )


def run(messages: int, failure_rate: float, workers: int, redis_url: str, seed: int) -> dict[str, object]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    keys = Keys("fr")
    logs = Path(tempfile.mkdtemp(prefix="fault-run-"))
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": redis_url,
            "FIREHOSE_AUTH_TOKEN": TOKEN,
            "RETRY_BACKOFF_BASE": "0.1",
            "RETRY_BACKOFF_MAX": "2",
            "RETRY_MAX_ATTEMPTS": "8",
            "PUMP_BLOCK_MS": "100",
            "PARTNER_RATE_LIMIT": "none",
            "PYTHONUNBUFFERED": "1",
        }
    )
    procs = []
    try:
        stub_proc, stub = start_stub(env, logs)
        procs.append(stub_proc)
        env["PARTNER_API_URL"] = stub.url
        stub.faults([{"path_prefix": "/v1/events", "status": 503, "probability": failure_rate, "seed": seed}])
        procs.extend(start_worker(f"worker{i}", env, logs) for i in range(workers))
        web_proc, url = start_web(env, logs)
        procs.append(web_proc)

        sent = [event_batch(i) for i in range(messages)]
        session = requests.Session()

        def post(message: dict) -> int:
            body = orjson.dumps(message)
            headers = {"Authorization": f"Token {TOKEN}"}
            return session.post(f"{url}/firehose", data=body, headers=headers, timeout=10).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, sent))
        accepted = sum(s == 202 for s in statuses)
        wait_for(lambda: drained(client, keys), timeout=600, interval=0.5, what="every message delivered or dead")
        elapsed = time.monotonic() - started

        requests_seen = stub.requests("/v1/events")
        state = stub.state()
        delivered_ids = {
            batch["message_id"]
            for r in requests_seen
            if r["status"] == 202 and not r["duplicate"]
            for batch in r["body"]["batches"]
        }
        events = state["events"]
        expected_events = {e["id"] for m in sent for e in m["events"]}
        stats = {k.decode(): int(float(v)) for k, v in client.hgetall(keys.stats).items()}
        return {
            "messages sent": messages,
            "answered 202": accepted,
            "delivered (unique messages at the stub)": len(delivered_ids),
            "events delivered exactly once": sum(1 for i in expected_events if events.get(i) == 1),
            "events delivered more than once": sum(1 for i in expected_events if events.get(i, 0) > 1),
            "events missing": sum(1 for i in expected_events if i not in events),
            "partner calls": len(requests_seen),
            "calls failed by the stub (503)": sum(r["status"] == 503 for r in requests_seen),
            "repeats seen by the stub (same Idempotency-Key after a 2xx)": state["duplicates"],
            "retries scheduled": stats.get("retried", 0),
            "dead-lettered": client.zcard(keys.dead_letter_index),
            "seconds from first POST to drained": round(elapsed, 1),
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--failure-rate", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args(argv)
    if not 0 < args.messages <= 100_000:
        parser.error("--messages must be between 1 and 100000")
    result = run(args.messages, args.failure_rate, args.workers, args.redis_url, args.seed)
    print(f"| fault run: {args.messages} messages, {args.failure_rate:.0%} of partner calls fail (503) | |")
    print("| --- | --- |")
    for name, value in result.items():
        print(f"| {name} | {value} |")
    return 0 if result["events missing"] == 0 and result["events delivered more than once"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
