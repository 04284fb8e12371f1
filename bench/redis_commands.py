"""The Redis commands one event message costs from acceptance to the partner's 2xx, and the
message rate at which one Redis primary becomes the bottleneck: `python -m bench.redis_commands`.

Starts the partner stub, one Celery worker and the web (as bench/perf.py does) on a database of
BENCH_REDIS (default redis://127.0.0.1:6379, database 11, emptied), warms up, resets Redis's
statistics (CONFIG RESETSTAT), posts COUNT event messages through /firehose and waits until the
stub has them all. Then `INFO commandstats` gives the calls and microseconds per command, and
`INFO cpu` the Redis process's CPU (commands plus network I/O and everything else), per message.
Idle polling (the pump's and Celery's blocking reads) is counted in, as it is in production.
Use a Redis of its own: every client of that server counts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests

from bench.redis_memory import event_bodies
from common import stats as stats_names
from common.keys import BACKLOG_LUA, Keys
from devtools.procs import Proc, start_stub, start_web, start_worker, wait_for

TOKEN = "bench-token"
KEYS = Keys("fr")
PEAK = 10_000  # requests/s mParticle plans for a large customer


def _cpu(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379").rstrip("/") + "/11")
    parser.add_argument("--count", type=int, default=2_000)
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis)
    client.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREHOSE_", "PARTNER_", "RETRY_"))}
    env |= {"REDIS_URL": args.redis, "FIREHOSE_AUTH_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    logs = Path(tempfile.mkdtemp(prefix="redis-commands-"))
    procs: list[Proc] = []
    try:
        stub_proc, stub = start_stub(env, logs)
        procs.append(stub_proc)
        env["PARTNER_API_URL"] = stub.url
        procs.append(start_worker("bench-worker", env, logs))
        web, url = start_web(env, logs, "bench-web")
        procs.append(web)
        session = requests.Session()
        headers = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}

        def post(body: bytes) -> None:
            status = session.post(f"{url}/firehose", data=body, headers=headers, timeout=10).status_code
            if status != 202:
                raise SystemExit(f"posting answered {status}")

        def run(bodies: list[bytes]) -> None:
            done = int(client.hget(KEYS.stats, stats_names.DELIVERED) or 0)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(post, bodies))

            def arrived() -> bool:
                backlog, _ = client.eval(BACKLOG_LUA, 2, KEYS.inbox, KEYS.lanes, KEYS.lane_prefix)
                delivered = int(client.hget(KEYS.stats, stats_names.DELIVERED) or 0)
                return int(backlog) == 0 and delivered >= done + len(bodies)

            wait_for(arrived, 600, interval=0.2, what="every message at the stub")

        run(event_bodies(50))  # warm-up: scripts loaded, connections open
        bodies = event_bodies(args.count)
        client.config_resetstat()
        cpu_before, started = _cpu(client), time.monotonic()
        run(bodies)
        cpu, elapsed = _cpu(client) - cpu_before, time.monotonic() - started
        stats = client.info("commandstats")
    finally:
        for proc in reversed(procs):
            proc.stop()
    n = len(bodies)
    rows = sorted(
        ((name.removeprefix("cmdstat_"), s["calls"] / n, s["usec"] / n) for name, s in stats.items()),
        key=lambda r: -r[1],
    )
    calls, usec = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{n:,} event messages, web -> pump -> Celery -> task -> partner stub, in {elapsed:.1f} s\n")
    print("| command | calls per message | µs per message |\n| --- | ---: | ---: |")
    for name, per, us in rows:
        if per >= 0.01:
            print(f"| {name} | {per:.2f} | {us:.1f} |")
    print(f"| **all** | **{calls:.1f}** | **{usec:.1f}** |\n")
    cpu_us = cpu * 1e6 / n
    print(f"Redis CPU per message (INFO cpu, commands + I/O): {cpu_us:.0f} µs")
    print(f"One primary saturates at about {1e6 / usec:,.0f} messages/s on command time alone,")
    print(f"about {1e6 / cpu_us:,.0f} messages/s on its whole CPU (one core, this machine);")
    print(f"{PEAK:,} requests/s at peak take {-(-PEAK * cpu_us // 1e6):.0f} primaries at 100 % CPU, ")
    print(f"{-(-PEAK * cpu_us // 0.5e6):.0f} at a 50 % planning ceiling.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
