"""Did a change make ingest faster? This checkout against another revision, side by side.

    .venv/bin/python -m bench.compare HEAD~1                  # the iOS sample, 4 rounds
    .venv/bin/python -m bench.compare main --body membership100 --rounds 6

REV is checked out into a temporary git worktree; its service, this checkout's service and the
bare Flask app run under their own gunicorn.conf.py (the bare app under this one's) and take
wrk's load in turn, the order alternating every round, as in `make bench`. Because the three
share every moment of the machine, the ratios between them mean something even where the
absolute numbers do not: web CPU per request is the steadiest figure. Uses database 8 of
BENCH_REDIS (default redis://127.0.0.1:6379) and empties it; everything stays on loopback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis

from bench import perf
from devtools.procs import ROOT, Proc, start_gunicorn

BODIES = {
    "ios": perf.ios_body,
    "batch100": lambda: perf.event_batch(100),
    "membership100": lambda: perf.membership_body(100),
}


def _worktree(rev: str, into: Path) -> Path:
    path = into / "rev"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), rev], cwd=ROOT, check=True, timeout=60)
    return path


def _row(name: str, runs: list[dict[str, Any]]) -> str:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    p99s = ", ".join(f"{r['p99_us'] / 1000:.1f}" for r in runs)
    return (
        f"| {name} | {med('rps'):,.0f} | {med('cpu_us'):,.0f} | {med('p50_us') / 1000:.2f} "
        f"| {med('p99_us') / 1000:.2f} ({p99s}) | {sum(r['one_worker'] for r in runs)} |"
    )


def _ratio(runs: dict[str, list[dict[str, Any]]], key: str, a: str, b: str) -> float:
    return statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the revision to compare this checkout against (HEAD~1, main, a sha)")
    parser.add_argument("--body", choices=sorted(BODIES), default="ios")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379"))
    args = parser.parse_args(argv)
    cfg = perf.Config(rounds=max(1, min(args.rounds, 10)), seconds=max(1.0, min(args.seconds, 30.0)))
    perf.ensure_wrk()

    scratch = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    redis_url = f"{args.redis.rstrip('/')}/{cfg.ingest_db}"
    client = redis.Redis.from_url(redis_url)
    env = perf.bench_env(redis_url)
    body = scratch / f"{args.body}.json"
    body.write_bytes(BODIES[args.body]())
    procs: list[Proc] = []
    worktree = None
    try:
        worktree = _worktree(args.rev, scratch)
        sides = {
            args.rev: ("service:create_app()", worktree),
            "this checkout": ("service:create_app()", ROOT),
            "bare Flask": ("bench.bare_app:create_app()", ROOT),
        }
        servers = {}
        for name, (app, cwd) in sides.items():
            servers[name] = start_gunicorn(app, env, scratch, f"compare-{len(servers)}", cwd=cwd)
            procs.append(servers[name][0])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        order = list(sides)
        for round_ in range(cfg.rounds):
            for name in order if round_ % 2 == 0 else order[::-1]:
                side = "bare" if name == "bare Flask" else "service"
                result = perf._load(cfg, client, servers[name], body, side, True)
                runs[name].append(result)
                print(f"  {name:<14} {result['rps']:7.0f} req/s  web CPU {result['cpu_us']:5.0f} us/req", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
        client.flushdb()
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False, timeout=60)
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{args.body}, {cfg.rounds} rounds of {cfg.seconds:g} s, {cfg.connections} connections\n")
    print("| side | req/s | web CPU us/req | p50 ms | p99 ms (each round) | one-worker runs |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for name, side_runs in runs.items():
        print(_row(name, side_runs))
    this, rev = "this checkout", args.rev
    print(
        f"\nthis checkout / {rev}: web CPU per request {_ratio(runs, 'cpu_us', this, rev):.3f}, "
        f"req/s {_ratio(runs, 'rps', this, rev):.3f}, p99 {_ratio(runs, 'p99_us', this, rev):.3f}"
        f"\nshare of bare Flask (req/s): this checkout {_ratio(runs, 'rps', this, 'bare Flask'):.2f}, "
        f"{rev} {_ratio(runs, 'rps', rev, 'bare Flask'):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
