"""One customer never slows another: key B's lag while key A's partner endpoint misbehaves.

    .venv/bin/python -m bench.isolation            # every scenario (about 10 minutes); writes bench/ISOLATION.md
    .venv/bin/python -m bench.isolation --quick    # smaller numbers (a few minutes); prints, writes nothing
    .venv/bin/python -m bench.isolation --only a_503 --only healthy

For each scenario, on loopback and from scratch: a private redis-server, the partner stub, the web
(devtools.procs.start_web: gunicorn.conf.py with 2 workers) and two Celery workers from the
Procfile's own `worker:` line, started together on this host; default settings except those the
scenario names. Then key A's load is posted (150 event batches, or four accounts' membership changes
of one user to 750 audiences each), then 30 event batches for key B, 2 a second. A B message's lag
runs from just before its POST to the arrival at the stub (its request log's `received_at`) of the
call that applied its last event. Then the fault rules are cleared and the bench waits, bounded, for
every piece of A's work to be at the partner exactly once, with nothing dead-lettered.
Every wait and loop is bounded in count and time, and every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import math
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
import requests

from common.config import Settings
from common.keys import Keys
from devtools.partner_stub.client import Stub
from devtools.procs import Proc, start_procfile_worker, start_stub, start_web
from devtools.redis_server import RedisServer
from devtools.samples import FIXTURES

OUTPUT = Path(__file__).with_name("ISOLATION.md")
RESULTS = Path(__file__).with_name("RESULTS.md")
TOKEN = "isolation-bench-token"
KEY_A = "isolation-key-a"
KEY_B = "isolation-key-b"
KEYS = Keys("fr")
IOS = FIXTURES / "3.2.0" / "EventProcessingRequest_ios.json"
MEMBERSHIP = FIXTURES / "3.2.0" / "AudienceMembershipChangeRequest.json"
# The goal every scenario is judged against.
GOAL_P95_SECONDS = 1.0


def sha(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Sizes:
    a_messages: int = 150
    b_messages: int = 30
    b_per_second: float = 2.0
    accounts: int = 4
    audiences: int = 750
    # After B's last post: how long B may take before its missing messages count as undelivered.
    b_deadline: float = 120.0
    # After A's endpoint recovers: how long A may take to be all delivered.
    recovery_deadline: float = 60.0


FULL = Sizes()
QUICK = Sizes(a_messages=30, b_messages=8, accounts=2, audiences=100, b_deadline=60.0)


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    env: dict[str, str] = field(default_factory=dict)
    # A's fault rules at the stub, scoped to A's API key.
    faults: list[dict[str, Any]] = field(default_factory=list)
    membership: bool = False


def _a_only(rule: dict[str, Any]) -> dict[str, Any]:
    return {"path_prefix": "/v1", "api_key_sha256": sha(KEY_A), **rule}


SCENARIOS = (
    Scenario("healthy", "healthy partner"),
    Scenario(
        "a_503",
        "A answers 503 at once, every call",
        {"DELIVERY_BATCH_MAX_MESSAGES": "1"},
        [_a_only({"status": 503})],
    ),
    Scenario(
        "a_rate_limited",
        "A at its rate limit",
        {"PARTNER_RATE_LIMIT": "5/second", "DELIVERY_BATCH_MAX_MESSAGES": "1"},
    ),
    Scenario(
        "a_hangs",
        "A hangs 5 s, then 503, every call",
        {"PARTNER_TIMEOUT_SECONDS": "10"},
        [_a_only({"status": 503, "latency_ms": 5000})],
    ),
    Scenario("membership", "four accounts: one user added to N audiences each", membership=True),
)


# ------------------------------------------------------------------------------ messages


def event_message(api_key: str) -> dict[str, Any]:
    message = orjson.loads(IOS.read_bytes())
    message["id"] = str(uuid.uuid4())
    message["account"]["account_settings"]["apiKey"] = api_key
    for event in message["events"]:
        event["id"] = str(uuid.uuid4())
    return message


def membership_message(api_key: str, account_id: int, audiences: int) -> dict[str, Any]:
    """One user added to `audiences` audiences: the shape mParticle sends for a big segment sync."""
    message = orjson.loads(MEMBERSHIP.read_bytes())
    message["id"] = str(uuid.uuid4())
    message["account"]["account_id"] = account_id
    message["account"]["account_settings"]["apiKey"] = api_key
    profile = deepcopy(message["user_profiles"][0])
    profile["mpid"] = str(1_000_000 + account_id)
    profile["audiences"] = [
        {"audience_id": 10_000 + n, "audience_name": f"Bench Audience {n}", "action": "add"} for n in range(audiences)
    ]
    message["user_profiles"] = [profile]
    return message


# ----------------------------------------------------------------------------- the stub's log


class Arrivals:
    """The stub's /v1/events log read incrementally (after_seq), so polling stays cheap for it:
    event id -> arrival time of the first call that applied it, and how often events were applied."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub
        self.after = 0
        self.first: dict[str, float] = {}
        self.pending: dict[int, dict[str, Any]] = {}

    def poll(self) -> None:
        reply = requests.get(
            f"{self.stub.url}/_stub/requests",
            params={"path_prefix": "/v1/events", "after_seq": self.after},
            timeout=10,
        ).json()["requests"]
        for call in reply:
            self.pending[call["seq"]] = call
            self.after = max(self.after, call["seq"])
        # A call still being answered has no status yet: read it again until it has one.
        for seq, call in list(self.pending.items()):
            if call["status"] is None:
                self.after = min(self.after, seq - 1)
                continue
            del self.pending[seq]
            if call["fault"] or call["duplicate"] or not 200 <= call["status"] < 300:
                continue
            for batch in (call.get("body") or {}).get("batches", []):
                for event in batch.get("events", []):
                    event_id = event.get("id")
                    if event_id is not None and event_id not in self.first:
                        self.first[event_id] = call["received_at"]

    def arrived(self, message: dict[str, Any]) -> float | None:
        times = [self.first.get(event["id"]) for event in message["events"]]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)


# ------------------------------------------------------------------------------- processes


def relay_env(redis_url: str, stub_url: str, scenario_env: dict[str, str]) -> dict[str, str]:
    """The defaults of every setting (none of the caller's own), then what the scenario names."""
    ours = {Settings.env_name(name) for name in Settings.model_fields} | {"PORT", "PROMETHEUS_MULTIPROC_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(
        {
            "REDIS_URL": redis_url,
            "PARTNER_API_URL": stub_url,
            "FIREHOSE_AUTH_TOKEN": TOKEN,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(scenario_env)
    return env


@contextmanager
def stack(scenario: Scenario, logs: Path) -> Iterator[tuple[str, Stub, redis.Redis]]:
    """Redis, stub, web and two Procfile workers; every one stopped on the way out."""
    procs: list[Proc] = []
    server = RedisServer(logs, logs, name=f"{scenario.name}-redis")
    try:
        server.start()
        stub_proc, stub = start_stub(dict(os.environ, STUB_LOG_LEVEL="WARNING"), logs, name=f"{scenario.name}-stub")
        procs.append(stub_proc)
        env = relay_env(server.url, stub.url, scenario.env)
        web, url = start_web(env, logs, name=f"{scenario.name}-web")
        procs.append(web)
        # The Procfile's line twice, at once, as two copies of one deploy on one host would start.
        workers = [start_procfile_worker(f"{scenario.name}-worker{n}", env, logs) for n in range(2)]
        procs.extend(workers)
        for worker in workers:
            worker.wait_output("ready.", timeout=60)
        yield url, stub, redis.Redis.from_url(server.url)
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()


def wait_bounded(predicate: Callable[[], bool], timeout: float, interval: float) -> bool:
    """True once predicate() is; False when `timeout` passed first (never raises for time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --------------------------------------------------------------------------------- a run


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def run_scenario(scenario: Scenario, sizes: Sizes, logs: Path) -> dict[str, Any]:
    with stack(scenario, logs) as (url, stub, client):
        session = requests.Session()
        headers = {"Authorization": f"Token {TOKEN}"}

        def post(message: dict[str, Any]) -> None:
            answer = session.post(f"{url}/firehose", data=orjson.dumps(message), headers=headers, timeout=10)
            answer.raise_for_status()

        stub.faults(scenario.faults)
        # A's load, as fast as the web takes it.
        a_events: list[dict[str, Any]] = []
        a_members: list[tuple[str, int]] = []
        if scenario.membership:
            for n in range(sizes.accounts):
                api_key = f"{KEY_A}-account{n}"
                post(membership_message(api_key, 50_000 + n, sizes.audiences))
                a_members.append((api_key, 1_000_000 + 50_000 + n))
        else:
            for _ in range(sizes.a_messages):
                message = event_message(KEY_A)
                post(message)
                a_events.append(message)

        # B's messages at their steady pace; the log is read between posts.
        arrivals = Arrivals(stub)
        gap = 1.0 / sizes.b_per_second
        sent: list[tuple[float, dict[str, Any]]] = []
        started = time.monotonic()
        for n in range(sizes.b_messages):
            time.sleep(max(0.0, started + n * gap - time.monotonic()))
            message = event_message(KEY_B)
            sent.append((time.time(), message))
            post(message)
        arrivals.poll()

        def b_done() -> bool:
            arrivals.poll()
            return all(arrivals.arrived(m) is not None for _, m in sent)

        wait_bounded(b_done, sizes.b_deadline, 0.25)
        lags = [done - posted for posted, m in sent if (done := arrivals.arrived(m)) is not None]

        # A's endpoint recovers: is all of A's work at the partner, once, within the deadline?
        stub.faults([])
        recovered_at = time.monotonic()

        def a_done() -> bool:
            state = stub.state()
            if scenario.membership:
                return all(
                    sum(1 for audience, members in state["members"].items() if audience.startswith(sha(k) + ":"))
                    >= sizes.audiences
                    for k, _ in a_members
                )
            got = state["events_by_api_key"].get(sha(KEY_A), {})
            return all(e["id"] in got for m in a_events for e in m["events"])

        a_in_time = wait_bounded(a_done, sizes.recovery_deadline, 0.5)
        a_seconds = time.monotonic() - recovered_at
        state = stub.state()
        twice = sum(1 for count in state["events"].values() if count > 1)
        dead = int(client.hlen(KEYS.dead_letters))
        if scenario.membership:
            a_total = sizes.accounts * sizes.audiences
            a_got = sum(
                1
                for k, _ in a_members
                for audience, members in state["members"].items()
                if audience.startswith(sha(k) + ":") and members
            )
        else:
            a_total = sum(len(m["events"]) for m in a_events)
            got = state["events_by_api_key"].get(sha(KEY_A), {})
            a_got = sum(1 for m in a_events for e in m["events"] if e["id"] in got)
        client.close()
        return {
            "scenario": scenario.name,
            "label": scenario.label.replace("N audiences", f"{sizes.audiences} audiences").replace(
                "four accounts", f"{sizes.accounts} accounts"
            ),
            "env": scenario.env,
            "b_sent": len(sent),
            "b_delivered": len(lags),
            "p50": percentile(lags, 0.5),
            "p95": percentile(lags, 0.95),
            "max": max(lags) if lags else None,
            "a_in_time": a_in_time and twice == 0 and dead == 0 and state["duplicates"] == 0,
            "a_seconds": a_seconds,
            "a_got": a_got,
            "a_total": a_total,
            "a_twice": twice,
            "dead": dead,
            "duplicates": state["duplicates"],
        }


# ------------------------------------------------------------------------------- report


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(rows: list[dict[str, Any]], sizes: Sizes, command: str) -> str:
    lines = [
        "# Isolation: one customer never slows another",
        "",
        f"`{command}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores "
        f"(shared by Redis, the stub, the web, both workers and the bench). Each scenario from scratch: a private "
        f"redis-server, the partner stub, the web and two workers from the Procfile's `worker:` line, default "
        f"settings except those named. Key A's load first ({sizes.a_messages} event batches, or the membership "
        f"changes), then {sizes.b_messages} event batches for key B at {sizes.b_per_second:g}/s. B's lag: its POST "
        "to the arrival at the partner of the call that applied its last event. Then A's fault rules are cleared: "
        f'"A once" says whether all of A\'s work was at the partner within {sizes.recovery_deadline:g} s, each '
        "event applied once, no repeat by Idempotency-Key and nothing dead-lettered. "
        f"Goal: B's p95 ≤ {GOAL_P95_SECONDS:g} s in each.",
        "",
        "| Scenario | Settings | B delivered | B lag p50 (s) | p95 (s) | max (s) | goal | A once after recovery |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        settings = ", ".join(f"`{k}={v}`" for k, v in row["env"].items()) or "defaults"
        met = row["p95"] is not None and row["p95"] <= GOAL_P95_SECONDS and row["b_delivered"] == row["b_sent"]
        if row["a_in_time"]:
            a_once = f"yes ({row['a_seconds']:.1f} s)"
        else:
            a_once = (
                f"**no**: {row['a_got']}/{row['a_total']} delivered, {row['a_twice']} applied twice, "
                f"{row['duplicates']} repeats, {row['dead']} dead-lettered"
            )
        lines.append(
            f"| {row['label']} | {settings} | {row['b_delivered']}/{row['b_sent']} | {_s(row['p50'])} | "
            f"{_s(row['p95'])} | {_s(row['max'])} | {'met' if met else '**not met**'} | {a_once} |"
        )
    return "\n".join(lines) + "\n"


def link_from_results() -> None:
    """RESULTS.md points here (bench.perf writes the line too); added once, if missing."""
    line = "Isolation between customers (`make bench-isolation`): [ISOLATION.md](ISOLATION.md)."
    if RESULTS.exists() and "ISOLATION.md" not in RESULTS.read_text():
        RESULTS.write_text(RESULTS.read_text().rstrip("\n") + "\n\n" + line + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller numbers, a smoke check; writes nothing")
    parser.add_argument("--only", action="append", choices=[s.name for s in SCENARIOS], help="run these only")
    parser.add_argument("--output", type=Path, help=f"where to write the table (default {OUTPUT}; none for --quick)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    command = "python -m bench.isolation" + (" --quick" if args.quick else "")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        logs = Path(tmp)
        for scenario in chosen:
            print(f"-- {scenario.name}: {scenario.label}", flush=True)
            try:
                row = run_scenario(scenario, sizes, logs)
            except Exception:
                # The processes' own words, before the temporary directory goes.
                for log in sorted(logs.glob(f"{scenario.name}-*.log")):
                    print(f"== {log.name}\n{log.read_text(errors='replace')[-2000:]}")
                raise
            print(
                f"   B {row['b_delivered']}/{row['b_sent']} p50 {_s(row['p50'])} p95 {_s(row['p95'])} "
                f"max {_s(row['max'])}; A once: {row['a_in_time']} ({row['a_got']}/{row['a_total']}, "
                f"{row['a_seconds']:.1f} s, dead {row['dead']})",
                flush=True,
            )
            rows.append(row)
    table = render(rows, sizes, command)
    print()
    print(table)
    output = args.output or (None if args.quick else OUTPUT)
    if output is not None:
        output.write_text(table)
        if output == OUTPUT:
            link_from_results()
        print(f"written to {output}")
        from bench import charts  # matplotlib only when there is something to draw

        for chart in charts.draw_isolation(output, out=output.parent):
            print(f"drawn {chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
