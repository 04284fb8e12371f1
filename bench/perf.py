"""The performance benchmark behind `make bench`: the relay against a bare Flask floor, in one run.

    .venv/bin/python -m bench.perf            # the full run (under 10 minutes), writes bench/RESULTS.md
    .venv/bin/python -m bench.perf --smoke    # tiny numbers, a few seconds of load; writes nothing

What it measures, everything on loopback (127.0.0.1), with Redis databases 8 and 9 of a private
redis-server started for the run (or of the server at BENCH_REDIS, where both are emptied):

* ingest: wrk (one thread, 16 connections) against the service's /firehose and against
  bench/bare_app.py under the same gunicorn.conf.py, alternating, for four bodies; every request
  carries a fresh message id (bench/fresh_id.lua) so dedupe never short-circuits. The service's
  inbox must hold one entry per 2xx counted, or the run fails.
* cost growth: the answer time of event batches of 1 to 1,000 events, sequential, service and bare.
* end to end: partner stub, a Celery worker with the default settings and the web; event batches
  posted through /firehose until they all arrived at the stub; then a backlog of 100,000 events
  stored in the inbox with the service's own Lua script, timed until the stub has every event.
* memory: peak RSS (VmHWM) of the web workers and the Celery processes.

Absolute numbers move with whatever else the machine runs; the ratios to the bare app, taken
side by side in the same run, are what to compare. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis
import requests

from bench import redis_memory
from bench.fault_run import API_KEY, TOKEN, drained
from common.keys import Keys, mark_digest
from devtools.procs import BIN, ROOT, Proc, start_gunicorn, start_stub, start_worker, wait_for
from devtools.redis_server import RedisServer
from devtools.samples import FIXTURES
from service.ingest import _ACCEPT

# The project's own fixtures (devtools/make_fixtures.py), so the bench runs on a fresh clone.
SAMPLES = FIXTURES
IOS_SAMPLE = SAMPLES / "3.2.0" / "EventProcessingRequest_ios.json"
MEMBERSHIP_SAMPLE = SAMPLES / "3.2.0" / "AudienceMembershipChangeRequest.json"
LUA = Path(__file__).with_name("fresh_id.lua")
RESULTS = Path(__file__).with_name("RESULTS.md")
# Stands for the message id in a body file; fresh_id.lua replaces it in every request.
PLACEHOLDER = "ffffffff-ffff-4fff-bfff-ffffffffffff"
KEYS = Keys("fr")


# ------------------------------------------------------------------------------ bodies


def _sample(path: Path) -> dict[str, Any]:
    return orjson.loads(path.read_bytes())


def ios_body() -> bytes:
    """The 3.2.0 iOS fixture byte for byte (pretty-printed, about 7 KB), its id made the placeholder."""
    raw = IOS_SAMPLE.read_bytes()
    original = _sample(IOS_SAMPLE)["id"].encode()
    assert raw.count(original) == 1, "the sample's id should appear once"
    return raw.replace(original, PLACEHOLDER.encode())


def event_batch(n_events: int, message_id: str = PLACEHOLDER) -> bytes:
    """An event_processing_request shaped like the iOS sample, with n events (compact JSON)."""
    message = _sample(IOS_SAMPLE)
    templates = message["events"]
    events = []
    for i in range(n_events):
        event = deepcopy(templates[i % len(templates)])
        event["id"] = str(uuid.UUID(int=i + 1))
        events.append(event)
    message.update(id=message_id, events=events)
    message["account"]["account_settings"]["apiKey"] = API_KEY
    return orjson.dumps(message)


def verification_body() -> bytes:
    """What mParticle sends to check the endpoint: an event batch with no events (nothing queued)."""
    message = _sample(IOS_SAMPLE)
    # Without notifications too: consent notifications alone are work, and would be queued.
    message.update(id=PLACEHOLDER, events=[], system_notifications=[])
    return orjson.dumps(message)


def membership_body(n_profiles: int) -> bytes:
    message = _sample(MEMBERSHIP_SAMPLE)
    template = message["user_profiles"][0]
    profiles = []
    for i in range(n_profiles):
        profile = deepcopy(template)
        profile["mpid"] = str(-(2**62) + i)
        profiles.append(profile)
    message.update(id=PLACEHOLDER, user_profiles=profiles)
    # The sample's account has no apiKey, and a change with work and no apiKey is refused at the
    # door (400): without one the bench would measure the error path, not the store.
    message["account"]["account_settings"]["apiKey"] = API_KEY
    return orjson.dumps(message)


# ---------------------------------------------------------------------------- processes


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in task.read_text().split()]
    return found


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM: the most resident memory the process ever had."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def max_peak(pids: list[int]) -> float | None:
    values = [v for v in (peak_rss_mib(p) for p in pids) if v is not None]
    return max(values) if values else None


# ----------------------------------------------------------------------------------- wrk


def ensure_wrk() -> str:
    """wrk from Debian's package, installed if missing (apt-get update first only when needed)."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = ["apt-get", "install", "-y", "-qq", "wrk"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        apt = ["sudo", *apt]
    print("wrk is missing: installing the Debian package", flush=True)
    if subprocess.run(apt, check=False, timeout=300).returncode != 0:
        update = [*apt[: apt.index("install")], "update", "-qq"]
        subprocess.run(update, check=True, timeout=300)
        subprocess.run(apt, check=True, timeout=300)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("could not install wrk")
    return found


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stdout or out.stderr).split("Copyright")[0].strip()


def run_wrk(
    url: str, body_file: Path, seconds: float, connections: int, pace_ms: float | None = None
) -> dict[str, Any]:
    """One wrk run; with `pace_ms`, each connection pauses that long between answer and next request."""
    env = dict(os.environ)
    env.pop("WRK_PACE_MS", None)
    if pace_ms:
        env["WRK_PACE_MS"] = f"{pace_ms:g}"
    args = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "2s",
        "--latency",
        "-s",
        str(LUA),
        f"{url}/firehose",
        "--",
        str(body_file),
        PLACEHOLDER,
        secrets.token_hex(4),
        TOKEN,
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    result = orjson.loads(lines[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(
        result[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return result


# -------------------------------------------------------------------------------- config


@dataclass
class Config:
    rounds: int = 5
    seconds: float = 4.0
    warmup: float = 1.0
    connections: int = 16
    growth_sizes: tuple[int, ...] = (1, 10, 100, 1000)
    growth_requests: int = 40
    e2e_messages: int = 2000
    e2e_events_per_message: int = 10
    backlog_messages: int = 10_000
    drain_timeout: float = 300.0
    # The iOS sample once more with this many gunicorn workers for both apps (0: not measured).
    alt_workers: int = 3
    # The iOS sample once more below saturation: each connection pauses this long between an
    # answer and its next request, about 2,000 requests/s in all, mParticle's average for a
    # large customer (0: not measured).
    pace_ms: float = 7.0
    # wrk runs per measurement at most, while a run's connections all went to one worker.
    balance_attempts: int = 3
    redis_base: str = "redis://127.0.0.1:6379"
    ingest_db: int = 8
    e2e_db: int = 9
    smoke: bool = False


SMOKE = {
    "rounds": 1,
    "seconds": 1.0,
    "warmup": 0.0,
    "growth_requests": 3,
    "e2e_messages": 40,
    "backlog_messages": 200,
    "drain_timeout": 60.0,
    "alt_workers": 0,
    "balance_attempts": 1,
}


# -------------------------------------------------------------------------------- ingest


SCENARIOS = (
    ("ios", "(a) 3.2.0 iOS fixture, 2 events (7 KB)"),
    ("batch100", "(b) event batch, 100 events"),
    ("verification", "(c) verification: empty event batch"),
    ("membership100", "(d) membership change, 100 profiles"),
)


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _load(
    cfg: Config,
    client: redis.Redis,
    server: tuple[Proc, str],
    body: Path,
    side: str,
    stores: bool,
    pace_ms: float | None = None,
) -> dict[str, Any]:
    """One wrk run against one server; for the service, every 2xx must have stored one entry.

    With keep-alive, wrk's connections stay with the worker that accepted them; under stock
    gthread (an older revision in bench.compare, or GUNICORN_WORKER_CLASS=gthread) one worker now
    and then accepts most or all of them while the others idle (service/gunicorn_worker.py takes
    turns): such a run measures one worker, not the app. It is counted (`one_worker`), and the run is made again
    with new connections, up to `balance_attempts` times in all.
    """
    proc, url = server
    if cfg.warmup:
        run_wrk(url, body, cfg.warmup, cfg.connections, pace_ms)
        time.sleep(0.3)  # what was still in flight when wrk stopped lands before the flush
    workers = children(proc.popen.pid)
    one_worker = 0
    for _ in range(max(1, cfg.balance_attempts)):
        client.flushdb()
        before = [cpu_seconds([pid]) for pid in workers]
        result = run_wrk(url, body, cfg.seconds, cfg.connections, pace_ms)
        used = [cpu_seconds([pid]) - b for pid, b in zip(workers, before, strict=True)]
        result["cpu_us"] = sum(used) / max(1, result["requests"]) * 1e6
        time.sleep(0.3)
        # Evenly spread, no worker works much more than the average; past 1.4 times (a 70/30
        # split of two workers), the busiest worker is what the run measures.
        if len(used) < 2 or max(used) <= 1.4 * sum(used) / len(used):
            break
        one_worker += 1
    result["one_worker"] = one_worker
    if side == "service":
        result["stored"] = client.xlen(KEYS.inbox)
        expected = result["requests"] if stores else 0
        # wrk counts the answers it read; requests still in flight when it stopped were stored too.
        if not expected <= result["stored"] <= expected + cfg.connections:
            raise RuntimeError(f"{body.name}: {result['requests']} answered but {result['stored']} stored")
    client.flushdb()
    if result["errors"]:
        raise RuntimeError(f"{body.name} on {side}: errors {result}")
    return result


def ingest(cfg: Config, env: dict[str, str], logs: Path, bodies_dir: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(f"{cfg.redis_base}/{cfg.ingest_db}")
    client.flushdb()
    bodies = {
        "ios": ios_body(),
        "batch100": event_batch(100),
        "verification": verification_body(),
        "membership100": membership_body(100),
    }
    files = {}
    for name, body in bodies.items():
        files[name] = bodies_dir / f"{name}.json"
        files[name].write_bytes(body)

    procs: list[Proc] = []
    try:
        servers: dict[str, tuple[Proc, str]] = {}
        variants = {"": env}
        if cfg.alt_workers:
            variants[f"w{cfg.alt_workers}"] = dict(env, WEB_CONCURRENCY=str(cfg.alt_workers))
        for variant, variant_env in variants.items():
            for side, app in (("service", "service:create_app()"), ("bare", "bench.bare_app:create_app()")):
                servers[side + variant] = start_gunicorn(app, variant_env, logs, f"ingest-{side}{variant}")
                procs.append(servers[side + variant][0])
        plan: list[tuple[str, str, str, float | None]] = [(name, name, "", None) for name, _ in SCENARIOS]
        if cfg.alt_workers:
            plan.append((f"ios-w{cfg.alt_workers}", "ios", f"w{cfg.alt_workers}", None))
        if cfg.pace_ms:
            plan.append(("ios-paced", "ios", "", cfg.pace_ms))
        table: dict[str, dict[str, list[dict[str, Any]]]] = {}
        load_before = load_average()
        for row, body, variant, pace_ms in plan:
            runs: dict[str, list[dict[str, Any]]] = {"bare": [], "service": []}
            for round_ in range(cfg.rounds):
                # Alternate who goes first, so a slow moment of the machine does not always hit one side.
                order = ("bare", "service") if round_ % 2 == 0 else ("service", "bare")
                for side in order:
                    result = _load(
                        cfg, client, servers[side + variant], files[body], side, body != "verification", pace_ms
                    )
                    runs[side].append(result)
                    print(
                        f"  ingest {row:<14} {side:<8} {result['rps']:8.0f} req/s"
                        f"  p50 {result['p50_us'] / 1000:6.2f} ms  p99 {result['p99_us'] / 1000:6.2f} ms"
                        f"  max {result['max_us'] / 1000:7.2f} ms  web CPU {result['cpu_us']:5.0f} us/req",
                        flush=True,
                    )
            table[row] = runs

        load_after = load_average()
        urls = {side: servers[side][1] for side in ("bare", "service")}
        growth = cost_growth(cfg, urls)
        memory = {side: max_peak(children(servers[side][0].popen.pid)) for side in ("service", "bare")}
        return {
            "table": table,
            "growth": growth,
            "memory": memory,
            "sizes": {k: len(v) for k, v in bodies.items()},
            "load": (load_before, load_after),
        }
    finally:
        for proc in reversed(procs):
            proc.stop()
        client.flushdb()


def cost_growth(cfg: Config, urls: dict[str, str]) -> dict[int, dict[str, Any]]:
    """Median answer time of one request at a time, batch sizes side by side with the bare app."""
    sessions = {side: requests.Session() for side in urls}
    headers = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}
    out: dict[int, dict[str, Any]] = {}
    for size in cfg.growth_sizes:
        template = event_batch(size)
        times: dict[str, list[float]] = {"bare": [], "service": []}
        for i in range(cfg.growth_requests + 2):
            for side in ("service", "bare"):
                body = template.replace(PLACEHOLDER.encode(), str(uuid.uuid4()).encode())
                started = time.perf_counter()
                response = sessions[side].post(f"{urls[side]}/firehose", data=body, headers=headers, timeout=10)
                elapsed = time.perf_counter() - started
                if response.status_code != 202:
                    raise RuntimeError(f"{size} events on {side}: {response.status_code} {response.text[:300]}")
                if i >= 2:  # the first two warm the connection and the code path
                    times[side].append(elapsed * 1000)
        out[size] = {
            "bytes": len(template),
            **{f"{side}_p50": statistics.median(v) for side, v in times.items()},
            **{f"{side}_max": max(v) for side, v in times.items()},
        }
        print(
            f"  growth {size:>5} events ({len(template) / 1024:7.1f} KiB): service {out[size]['service_p50']:7.2f} ms"
            f"  bare {out[size]['bare_p50']:7.2f} ms",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- end to end


def _stub_has(stub: Any, expected: set[str]) -> int:
    events = stub.state()["events"]
    return sum(1 for event_id in expected if events.get(event_id, 0) >= 1)


def _messages(count: int, n_events: int) -> tuple[list[bytes], set[str]]:
    """Event batches for one API key, every message and event with a fresh id."""
    template = orjson.loads(event_batch(n_events))
    bodies, expected = [], set()
    for _ in range(count):
        message = dict(template, id=str(uuid.uuid4()))
        message["events"] = [dict(e, id=str(uuid.uuid4())) for e in template["events"]]
        expected.update(e["id"] for e in message["events"])
        bodies.append(orjson.dumps(message))
    return bodies, expected


def _arrival(
    stub: Any, messages: int, expected: set[str], elapsed: float, calls_before: int, **extra: float
) -> dict[str, Any]:
    """The figures of one end-to-end run, once every expected event has arrived at the stub."""
    state = stub.state()
    return {
        "messages": messages,
        "events": len(expected),
        **extra,
        "seconds": elapsed,
        "events_per_s": len(expected) / elapsed,
        "partner_calls": state["requests_seen"] - calls_before,
        "duplicates": sum(1 for e in expected if state["events"].get(e, 0) > 1),
    }


def _wait_arrived(cfg: Config, client: redis.Redis, stub: Any, expected: set[str], started: float) -> float:
    """Seconds from `started` until the stub holds every expected event (bounded by drain_timeout)."""
    deadline = started + cfg.drain_timeout
    # Drained is cheap to ask (four Redis calls); the stub's state is large, so it is asked once drained.
    wait_for(lambda: drained(client, KEYS), max(1.0, deadline - time.monotonic()), 0.1, "the queues to drain")
    arrived = _stub_has(stub, expected)
    while arrived < len(expected) and time.monotonic() < deadline:
        time.sleep(0.5)
        arrived = _stub_has(stub, expected)
    if arrived < len(expected):
        raise RuntimeError(f"only {arrived} of {len(expected)} events arrived within {cfg.drain_timeout}s")
    return time.monotonic() - started


def end_to_end(cfg: Config, env: dict[str, str], logs: Path) -> dict[str, Any]:
    redis_url = f"{cfg.redis_base}/{cfg.e2e_db}"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    env = dict(env, REDIS_URL=redis_url)
    procs: list[Proc] = []
    try:
        stub_proc, stub = start_stub(env, logs)
        procs.append(stub_proc)
        env["PARTNER_API_URL"] = stub.url
        worker = start_worker("bench-worker", env, logs)
        procs.append(worker)
        # The web as start_web runs it (2 workers), bound to loopback only.
        web, url = start_gunicorn("service:create_app()", dict(env, WEB_CONCURRENCY="2"), logs, "e2e-web")
        procs.append(web)

        # 1. Through the endpoint: from the first POST until the last event is at the stub.
        bodies, expected = _messages(cfg.e2e_messages, cfg.e2e_events_per_message)
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=16))
        headers = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}

        def post(body: bytes) -> int:
            return session.post(f"{url}/firehose", data=body, headers=headers, timeout=10).status_code

        stub.reset()
        calls_before = stub.state()["requests_seen"]
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, bodies))
        posted = time.monotonic() - started
        if set(statuses) != {202}:
            raise RuntimeError(f"posting answered {sorted(set(statuses))}")
        elapsed = _wait_arrived(cfg, client, stub, expected, started)
        post_result = _arrival(stub, len(bodies), expected, elapsed, calls_before, post_seconds=posted)
        print(f"  e2e posted: {post_result}", flush=True)

        # 2. A backlog already in the inbox, stored with the service's own script (as if the web had
        #    taken it while the workers were away), timed until the stub has every event.
        bodies, expected = _messages(cfg.backlog_messages, cfg.e2e_events_per_message)
        accept = client.register_script(_ACCEPT)
        stub.reset()
        started = time.monotonic()
        for chunk in range(0, len(bodies), 500):
            pipe = client.pipeline(transaction=False)
            for body in bodies[chunk : chunk + 500]:
                message = orjson.loads(body)
                message_id, account_id = message["id"], message["account"]["account_id"]
                # The arguments service/ingest.py's Ingest.accept gives the script.
                accept(
                    keys=[KEYS.inbox],
                    args=[
                        86400,
                        body,
                        "event_processing_request",
                        message_id,
                        "",
                        mark_digest(account_id, message_id),
                        KEYS.seen_marks,
                    ],
                    client=pipe,
                )
            pipe.execute()
        pushed = time.monotonic() - started
        elapsed = _wait_arrived(cfg, client, stub, expected, started)
        backlog = _arrival(stub, len(bodies), expected, elapsed, 0, push_seconds=pushed)
        print(f"  e2e backlog: {backlog}", flush=True)
        pool_pids = children(worker.popen.pid)
        memory = {
            "web": max_peak(children(web.popen.pid)),
            "worker_main": peak_rss_mib(worker.popen.pid),
            "worker_pool": max_peak(pool_pids),
            "worker_pool_processes": len(pool_pids),
        }
        return {"posted": post_result, "backlog": backlog, "memory": memory}
    finally:
        for proc in reversed(procs):
            proc.stop()
        client.flushdb()


# ------------------------------------------------------------------------------- report


def gunicorn_settings(env: dict[str, str]) -> dict[str, str]:
    """The settings gunicorn.conf.py gives under this environment, as gunicorn itself reports them."""
    out = subprocess.run(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--print-config", "bench.bare_app:create_app()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    settings = {}
    for line in out.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            settings[name.strip()] = value.strip()
    return settings


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        mem_kib = 0
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cores": str(os.cpu_count()),
        "cpu": model or platform.processor() or "?",
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "commit": commit + (" with uncommitted changes" if dirty else ""),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def pair_ratio(runs: dict[str, list[dict[str, Any]]]) -> float:
    """The median over rounds of service / bare, each round's two runs taken back to back: a slow
    moment of the machine hits both halves of a pair more often than two medians taken apart."""
    return statistics.median(s["rps"] / b["rps"] for b, s in zip(runs["bare"], runs["service"], strict=True))


def round_ratios(runs: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Each round's service / bare req/s: one unbalanced or disturbed round shows, where a median hides it."""
    return [s["rps"] / b["rps"] for b, s in zip(runs["bare"], runs["service"], strict=True)]


def _ingest_row(label: str, size: int, runs: dict[str, list[dict[str, Any]]]) -> str:
    bare, service = runs["bare"], runs["service"]
    ratio = pair_ratio(runs)
    spread = max(max(r["rps"] for r in side) / min(r["rps"] for r in side) - 1 for side in (bare, service))
    return (
        f"| {label} | {size:,} | {_med(bare, 'rps'):,.0f} | {_med(service, 'rps'):,.0f} | **{ratio:.2f}** "
        f"| {spread:.0%} "
        f"| {_ms(_med(service, 'p50_us'))} | {_ms(_med(service, 'p99_us'))} | {_ms(max(r['max_us'] for r in service))} "
        f"| {_ms(_med(bare, 'p50_us'))} | {_ms(_med(bare, 'p99_us'))} | {_ms(max(r['max_us'] for r in bare))} "
        f"| {_med(service, 'cpu_us'):,.0f} | {_med(bare, 'cpu_us'):,.0f} "
        f"| {sum(r['one_worker'] for r in service)} / {sum(r['one_worker'] for r in bare)} |"
    )


def report(cfg: Config, ingest_result: dict[str, Any], e2e: dict[str, Any], env: dict[str, str], command: str) -> str:
    m = machine()
    gunicorn = gunicorn_settings(env)
    workers = gunicorn.get("workers", "?")
    table, sizes = ingest_result["table"], ingest_result["sizes"]
    lines = [
        "# Benchmark results",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {m['cores']} cores ({m['cpu']}), {m['memory']} memory, Linux {m['kernel']}, Python {m['python']}",
        f"- commit: {m['commit']}",
        f"- command: `{command}`",
        f"- load: {wrk_version()}, 1 thread, {cfg.connections} connections; {cfg.rounds} rounds of "
        f"{cfg.seconds:g} s per side after {cfg.warmup:g} s of warm-up, bare and service back to back in each "
        "round (who goes first alternates); the ratio is the median of the rounds' service/bare ratios, the "
        "other figures medians of the rounds (max: the largest of any round)",
        f"- gunicorn: gunicorn.conf.py for both apps: {workers} `{gunicorn.get('worker_class', '?')}` workers, "
        f"{gunicorn.get('threads', '?')} threads each, keep-alive {gunicorn.get('keepalive', '?')} s; "
        "Redis on loopback",
        f"- load average (1 min) when the ingest runs began and ended: {ingest_result['load'][0]} and "
        f"{ingest_result['load'][1]}",
        "",
        "Everything runs on this one machine (wrk, gunicorn, Redis, Celery): compare the ratios, taken side by "
        "side in the same run, rather than the absolute numbers.",
        "",
        "## Ingest: `/firehose` against a bare Flask app answering 202",
        "",
        "Spread: how far apart the rounds of one side were (the larger of the two sides, fastest over slowest "
        "round); more than about 15 % means something else was using the machine and the row is not to be "
        "trusted. Web CPU is the user and system CPU of the gunicorn workers per request (not wrk's, not "
        "Redis's): the steadiest of these numbers on a shared machine. One-worker runs: wrk runs in which "
        "one gunicorn worker took most or all of the keep-alive connections (it used over 1.4 times the "
        "workers' average CPU) while the others idled; such a run measures one worker, so it was made again "
        f"with new connections (up to {cfg.balance_attempts} runs in all) and only the last one counts.",
        "",
        "| body | bytes | bare req/s | service req/s | ratio | spread | service p50 ms | p99 ms | max ms "
        "| bare p50 ms | p99 ms | max ms | service web CPU us/req | bare web CPU us/req "
        "| one-worker runs service / bare |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in SCENARIOS:
        lines.append(_ingest_row(label, sizes[name], table[name]))
    alt = f"ios-w{cfg.alt_workers}"
    if alt in table:
        lines.append(_ingest_row(f"(a) again, {cfg.alt_workers} workers for both apps", sizes["ios"], table[alt]))
    lines += [
        "",
        "Every service run was checked: one inbox entry per 2xx (none for verification), no errors and no "
        "non-2xx answers.",
        "",
        "Every round, service / bare req/s (p99 ms, service vs bare; `*`: a one-worker run was made again):",
        "",
    ]
    for name, label in SCENARIOS:
        runs_ = table[name]
        cells = [
            f"{ratio:.2f} ({s['p99_us'] / 1000:.1f} vs {b['p99_us'] / 1000:.1f})"
            + ("*" if s["one_worker"] or b["one_worker"] else "")
            for ratio, s, b in zip(round_ratios(runs_), runs_["service"], runs_["bare"], strict=True)
        ]
        lines.append(f"- {label}: {', '.join(cells)}")
    paced = table.get("ios-paced")
    if paced:
        lines += [
            "",
            "## Latency below saturation: the iOS sample at about mParticle's average rate",
            "",
            f"The same {cfg.connections} connections, each pausing {cfg.pace_ms:g} ms between an answer and its "
            "next request: a steady rate near the 2,000 requests/s mParticle plans for a large customer on "
            "average, where the rows above measure flat-out saturation (every connection sends again at once, "
            "so latency there is mostly queueing: connections / throughput).",
            "",
            "| side | req/s | p50 ms | p99 ms | max ms | web CPU us/req |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for side in ("service", "bare"):
            runs_ = paced[side]
            lines.append(
                f"| {side} | {_med(runs_, 'rps'):,.0f} | {_ms(_med(runs_, 'p50_us'))} | {_ms(_med(runs_, 'p99_us'))} "
                f"| {_ms(max(r['max_us'] for r in runs_))} | {_med(runs_, 'cpu_us'):,.0f} |"
            )
    lines += [
        "",
        "## Cost growth: answer time of one event batch at a time",
        "",
        f"Median (and max) of {cfg.growth_requests} sequential requests per size, measured by the client "
        "(requests.Session, keep-alive), each with a fresh message id.",
        "",
        "| events | bytes | service ms | bare ms | service max ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, row in ingest_result["growth"].items():
        lines.append(
            f"| {size:,} | {row['bytes']:,} | {row['service_p50']:.2f} | {row['bare_p50']:.2f} "
            f"| {row['service_max']:.2f} |"
        )
    lines += [
        "",
        "## End to end: POST to arrival at the partner stub",
        "",
        "The partner stub, one Celery worker as `devtools.procs.start_worker` starts it (the default pool, "
        "concurrency, pump and batching settings) and the web (gunicorn.conf.py, 2 workers), all on this machine; "
        "`PARTNER_RATE_LIMIT=none`, so that the relay is measured rather than the configured partner limit "
        f"(default 50 calls/s per API key). {cfg.e2e_events_per_message} events per message, one API key.",
        "",
        "| run | messages | events | seconds | events/s | partner calls | calls per event | events arrived twice |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    runs = (
        ("posted", "posted through `/firehose` by 8 client threads (posting took {post_seconds:.1f} s)"),
        ("backlog", "backlog drain: stored in the inbox first ({push_seconds:.1f} s), timed from the first store"),
    )
    for key, label in runs:
        r = e2e[key]
        lines.append(
            f"| {label.format(**r)} | {r['messages']:,} | {r['events']:,} | {r['seconds']:.1f} "
            f"| {r['events_per_s']:,.0f} | {r['partner_calls']:,} | {r['partner_calls'] / r['events']:.3f} "
            f"| {r['duplicates']} |"
        )
    memory = ingest_result["memory"]
    lines += [
        "",
        "## Memory: peak RSS (VmHWM)",
        "",
        "| process | MiB |",
        "| --- | ---: |",
        f"| web worker under the ingest load (largest of {workers}) | {_mib(memory['service'])} |",
        f"| bare Flask worker, same load | {_mib(memory['bare'])} |",
        f"| web worker, end to end | {_mib(e2e['memory']['web'])} |",
        f"| Celery worker main process (the inbox pump and, with the thread pool, every delivery) "
        f"| {_mib(e2e['memory']['worker_main'])} |",
    ]
    if e2e["memory"]["worker_pool_processes"]:
        lines.append(
            f"| Celery pool process (largest of {e2e['memory']['worker_pool_processes']}) "
            f"| {_mib(e2e['memory']['worker_pool'])} |"
        )
    lines += [
        "",
        "## Goals",
        "",
    ]
    ios = table["ios"]
    ratio = pair_ratio(ios)
    p99 = _med(ios["service"], "p99_us") / 1000
    worst = max(r["p99_us"] for r in ios["service"]) / 1000
    lowest = min(round_ratios(ios))
    batch = pair_ratio(table["batch100"])
    member = table["membership100"]
    member_ratio = pair_ratio(member)
    member_p99 = _med(member["service"], "p99_us") / 1000
    member_bare_p99 = _med(member["bare"], "p99_us") / 1000
    member_met = member_ratio >= 0.4 and member_p99 <= 3 * member_bare_p99 and member_p99 < 100
    lines += [
        f"- iOS sample at >= 0.5 of bare in every round: **{ratio:.2f}**, lowest round **{lowest:.2f}** "
        f"({'met' if lowest >= 0.5 else 'not met'})",
        f"- 100-event batch at >= 0.5 of bare: **{batch:.2f}** ({'met' if batch >= 0.5 else 'not met'})",
        f"- 100-profile membership change at >= 0.4 of bare, p99 at most 3 x bare's and under 100 ms: "
        f"**{member_ratio:.2f}**, p99 **{member_p99:.2f} ms** vs bare {member_bare_p99:.2f} ms "
        f"({'met' if member_met else 'not met'})",
        f"- p99 < 10 ms at {cfg.connections} connections, iOS sample: **{p99:.2f} ms** "
        f"({'met' if p99 < 10 else 'not met'}; worst round {worst:.2f} ms)",
    ]
    if paced:
        lines.append(
            f"- for comparison, p99 at about {_med(paced['service'], 'rps'):,.0f} req/s (paced, below saturation): "
            f"**{_med(paced['service'], 'p99_us') / 1000:.2f} ms**"
        )
    big = ingest_result["growth"].get(1000, {}).get("service_p50")
    if big is not None:
        lines.append(
            f"- 1,000-event batch answered in < 100 ms: **{big:.1f} ms** ({'met' if big < 100 else 'not met'})"
        )
    return "\n".join(lines) + "\n"


# What a profile of the web under gunicorn found: measured by hand, not by this run, so
# it is written as found and kept with the report rather than lost when `make bench` rewrites it.
PROFILE_NOTES = """
## Profile: where the web's CPU goes under gunicorn

Measured with the gunicorn workers' CPU time per request (`/proc/<pid>/stat`) in rounds alternating
with bare Flask, py-spy `--gil` (only the thread holding the GIL is sampled), the apps called
in-process straight through WSGI, and Redis's own CPU (INFO cpu) per message.

- Big messages: parsing every event or user profile built ~2,200 dicts and lists for a 130 KB
  membership change; building, collecting and freeing them was half the web's GIL-held time for it
  (orjson.loads 29 %, freeing the message 11 %, the depth trial write 8 %). The door now reads an
  event batch or membership change of 16 KB or more as a view (service/message_view.py, msgspec):
  every byte checked as JSON, every top-level field parsed by orjson, the items left raw (what it
  then leaves to the worker: workers/repair.py). Web CPU per membership change 0.64 of before.
- Redis: a body passed to the store's Lua script was copied into a Lua string and out again: about
  400 us of Redis CPU for a 130 KB change and 195 for a 56 KB batch, against 155 and 95 now that a
  big body has its own XADD beside the script in one MULTI/EXEC (service/ingest.py).
- Small messages: called in-process, a 7 KB event batch cost the app ~420 us through Flask (request
  and app contexts, URL matching, six hooks each asked whether it is a coroutine, a Response) and
  ~230 us through service/endpoint.py, the same functions called straight from WSGI with the
  request id, log line and metrics included (bare Flask: ~130 us); redis-py's pool took a lock, ran a
  deprecated-argument check, polled the socket and called four observability hooks per command.
  POST /firehose is now answered in front of Flask (service/endpoint.py), and each web thread talks
  to Redis on a connection of its own, one write and every reply read.
- Earlier: the cyclic garbage collector (gunicorn.conf.py freezes the start-up objects and raises
  the gen-0 threshold), connections balanced over the workers (service/gunicorn_worker.py).
"""


# The database bench.redis_memory fills and empties (the bench's other stages use their own).
REDIS_MEMORY_DB = 10


def redis_bytes_section(url: str, count: int) -> str:
    """What one accepted and delivered event message keeps in Redis for DEDUP_TTL_SECONDS (its marks),
    measured with the web's own store script and the gate's own mark writes (bench/redis_memory.py)."""
    client = redis.Redis.from_url(url)
    try:
        seen, delivered = redis_memory.bytes_per_message(client, count, 86_400)
    finally:
        client.close()
    total = (seen + delivered) * redis_memory.LIFETIME
    return (
        "\n## Redis per event message\n\n"
        f"{count:,} event messages through the web's store script, then their delivered marks as the gate "
        f"writes them (`python -m bench.redis_memory --count {count}`): **{total:.0f} bytes** per accepted and "
        f"delivered message for its lifetime, every mark included (seen {seen:.0f} + delivered {delivered:.0f}, "
        f"x {redis_memory.LIFETIME:g} for bucketed expiry; goal <= 100: "
        f"{'met' if total <= 100 else 'not met'}). Redis commands and CPU per message: "
        '`python -m bench.redis_commands` (README, "Sizing Redis").\n'
    )


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def bench_env(redis_url: str) -> dict[str, str]:
    """The environment of every process the bench starts.

    WEB_CONCURRENCY and GUNICORN_* pass through (to both apps alike); settings that would point
    the processes elsewhere do not."""
    dropped = ("FIREHOSE_", "PARTNER_", "RETRY_", "CELERY_", "REDIS_", "PROMETHEUS_MULTIPROC_DIR", "PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(
        {"FIREHOSE_AUTH_TOKEN": TOKEN, "PARTNER_RATE_LIMIT": "none", "PYTHONUNBUFFERED": "1", "REDIS_URL": redis_url}
    )
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny numbers: a check that the bench runs, no results")
    parser.add_argument("--output", type=Path, help=f"where to write the table (default {RESULTS}; none for --smoke)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument(
        "--redis",
        default=os.environ.get("BENCH_REDIS", ""),
        help="a Redis to use instead (its databases are emptied); default: a private redis-server for the run",
    )
    args = parser.parse_args(argv)

    cfg = Config(**SMOKE) if args.smoke else Config()
    cfg.smoke = args.smoke
    if args.rounds:
        cfg.rounds = max(1, min(args.rounds, 10))
    if args.seconds:
        cfg.seconds = max(1.0, min(args.seconds, 60.0))
    output = args.output or (None if args.smoke else RESULTS)
    for sample in (IOS_SAMPLE, MEMBERSHIP_SAMPLE):
        if not sample.is_file():
            raise SystemExit(f"missing {sample}: run .venv/bin/python -m devtools.make_fixtures")
    ensure_wrk()

    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    server = None
    if args.redis:
        cfg.redis_base = args.redis.rstrip("/")
    else:
        # Like the test suite: nothing needs to be running, and nobody's Redis gets emptied.
        server = RedisServer(logs, logs, name="bench-redis")
        server.start()
        cfg.redis_base = server.base_url()
        print(f"a private redis-server at {cfg.redis_base} (BENCH_REDIS: use another)", flush=True)
    env = bench_env(f"{cfg.redis_base}/{cfg.ingest_db}")
    started = time.monotonic()
    ok = False
    try:
        print("ingest and cost growth", flush=True)
        ingest_result = ingest(cfg, env, logs, logs)
        print("end to end", flush=True)
        e2e = end_to_end(cfg, env, logs)
        command = "make bench-smoke" if args.smoke else "make bench"
        extra = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--smoke"]
        if extra:
            command += f" (python -m bench.perf {' '.join(extra)})"
        text = report(cfg, ingest_result, e2e, env, command)
        print("redis bytes per message", flush=True)
        text += redis_bytes_section(f"{cfg.redis_base}/{REDIS_MEMORY_DB}", 2_000 if cfg.smoke else 100_000)
        ok = True
    finally:
        if server is not None:
            server.stop()
        if ok:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"logs kept in {logs}", file=sys.stderr)
    text += f"\nThe whole run took {time.monotonic() - started:.0f} s.\n"
    text += PROFILE_NOTES
    text += "\nIsolation between customers (`make bench-isolation`): [ISOLATION.md](ISOLATION.md).\n"
    print(text)
    if output:
        output.write_text(text)
        print(f"written to {output}")
        from bench import charts  # matplotlib only when there is something to draw

        for chart in charts.draw_results(output, out=output.parent):
            print(f"drawn {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
