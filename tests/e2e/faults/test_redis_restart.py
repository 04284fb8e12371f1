"""Redis dies (SIGKILL) and comes back while mParticle keeps posting, on a private redis-server
with append-only persistence (fsync on every write). The web must answer 503 while Redis is
down, never 2xx for what it could not store; web and workers reconnect by themselves; and
everything that got a 2xx is delivered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_lib
import requests

from devtools.faults import KIND_SAMPLES, Results, error_shape_problem, fresh_message, ledger, new_secret
from devtools.procs import start_web, start_worker
from devtools.redis_server import RedisServer
from tests.support import Stub, base_env, wait_for
from tests.support.stack import FAULT_SETTINGS, Stack

KINDS = list(KIND_SAMPLES)


# What Redis was doing, as the test drives it. Each answer records the phase its request was sent in
# and the phase it was answered in, so answers are judged by Redis's state, never by a clock window
# that a loaded machine can stretch.
BEFORE, DOWN, RESTARTING, AFTER = "before", "down", "restarting", "after"


@dataclass
class Answer:
    message: dict[str, Any]
    status: int | None
    started: float
    ended: float
    problem: str | None
    retry_after: str | None
    sent_in: str
    answered_in: str

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@pytest.fixture(scope="module")
def restart_stack(
    fault_stub: Stub, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory, fault_token: str
) -> Iterator[tuple[RedisServer, Stack]]:
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), logs_dir, name="faults-redis", durable=True)
    server.start()
    env = base_env(
        server.url,
        PARTNER_API_URL=fault_stub.url,
        FIREHOSE_AUTH_TOKEN=fault_token,
        **FAULT_SETTINGS,
        RETRY_BACKOFF_MAX="1",
        PARTNER_TIMEOUT_SECONDS="4",
        # fsync on every write on a busy machine can take longer than the production 60 ms budget;
        # with Redis up this test wants 2xx, and with it down a refused connection is immediate anyway.
        INGEST_REDIS_TIMEOUT_MS="2000",
    )
    procs = [start_worker("faults-restart-worker", env, logs_dir)]
    try:
        web, url = start_web(env, logs_dir, name="faults-restart-web")
        procs.append(web)
        yield server, Stack(url, server.url, redis_lib.Redis.from_url(server.url), env, procs, logs_dir)
    finally:
        for proc in procs:
            proc.stop()
        server.stop()


@pytest.mark.timeout(480)
def test_redis_killed_and_restarted_under_traffic(
    restart_stack: tuple[RedisServer, Stack],
    fault_stub: Stub,
    fault_token: str,
    sent_secrets: dict[str, str],
    fault_results: Results,
) -> None:
    server, stack = restart_stack
    fault_stub.faults([])
    answers: list[Answer] = []
    phase = BEFORE
    stop = threading.Event()
    session = requests.Session()
    headers = {"Authorization": f"Token {fault_token}"}

    def send(message: dict[str, Any]) -> None:
        sent_in, started = phase, time.monotonic()
        try:
            # A client timeout far above any answer the web gives (a refused Redis connection is
            # immediate): a request that still gets no answer is a hang, not a slow machine.
            response = session.post(f"{stack.url}/firehose", data=orjson.dumps(message), headers=headers, timeout=20)
            status, problem = response.status_code, None
            if status >= 400 and status != 503:
                problem = f"{status}: {response.text[:200]}"
            elif status == 503:
                problem = error_shape_problem(400, response.headers.get("Content-Type"), response.content)
            retry_after = response.headers.get("Retry-After")
        except requests.RequestException as exc:
            status, problem, retry_after = None, f"no answer: {type(exc).__name__}", None
        answers.append(Answer(message, status, started, time.monotonic(), problem, retry_after, sent_in, phase))

    def traffic() -> None:
        # Steady traffic until told to stop; the cap only bounds a test that has gone wrong.
        for index in range(3000):
            if stop.is_set():
                return
            api_key = new_secret("ak_restart")
            sent_secrets[f"apiKey restart #{index}"] = api_key
            send(fresh_message(KINDS[index % len(KINDS)], api_key))
            time.sleep(0.03)

    def answered(sent_in: str, answered_in: str) -> list[Answer]:
        return [a for a in list(answers) if a.sent_in == sent_in and a.answered_in == answered_in]

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        # Each wait below is for something that must happen; its deadline only bounds a broken run.
        wait_for(lambda: len([a for a in answered(BEFORE, BEFORE) if a.ok]) >= 10, 60, 0.1, "2xx before the fault")
        server.kill()  # returns once the process is gone: from here Redis is down
        phase = DOWN
        ready_down = requests.get(f"{stack.url}/readyz", timeout=20).status_code
        # Redis stays down until the web has answered a good number of requests sent and answered
        # entirely while it was down, however long that takes on this machine.
        wait_for(lambda: len(answered(DOWN, DOWN)) >= 10, 90, 0.1, "10 answers while Redis is down")
        phase = RESTARTING
        server.start()  # returns once the new redis-server answers PING (the AOF replayed)
        phase, back_at = AFTER, time.monotonic()
        # Reconnecting by itself: the web answers 2xx again without being restarted...
        recovered = wait_for(
            lambda: next((a for a in answered(AFTER, AFTER) if a.ok), None), 60, 0.1, "2xx after the restart"
        )
        # ...and from then on, for every request, not just the first lucky one.
        wait_for(
            lambda: len([a for a in answers if a.started > recovered.ended]) >= 20,
            90,
            0.1,
            "20 requests after the web recovered",
        )
    finally:
        stop.set()
        thread.join(60)
    ready_up = wait_for(
        lambda: requests.get(f"{stack.url}/readyz", timeout=20).status_code == 200, 60, 0.2, "/readyz after restart"
    )

    # mParticle sends again what was not answered 2xx, until it is (bounded).
    first_round = list(answers)
    for answer in first_round:
        if answer.ok:
            continue
        for _ in range(20):
            send(answer.message)
            if answers[-1].ok:
                break
            time.sleep(0.2)

    accepted_ids = {a.message["id"] for a in answers if a.ok}
    accepted = [m for m in {a.message["id"]: a.message for a in answers}.values() if m["id"] in accepted_ids]
    # Supervision, as compose's restart policy, ECS and Heroku give it: kombu 5.7 can end a worker
    # with "Unrecoverable error" while it reconnects to a restarted broker; a new one takes over.
    restarts: list[str] = []

    def supervise() -> None:
        for index, proc in enumerate(stack.workers):
            if "worker" in proc.name and proc.popen.poll() is not None:
                restarts.append(proc.name)
                stack.workers[index] = start_worker(f"faults-restart-worker-{len(restarts)}", stack.env, stack.logs_dir)

    def all_delivered() -> bool:
        supervise()
        return ledger(fault_stub, accepted).delivered == len(accepted)

    # Generous: after a Redis crash, work held by the dead connections comes back as claims,
    # leases and lane slots lapse; what matters is that every 2xx arrives, not how fast.
    wait_for(all_delivered, 360, 0.5, "every 2xx delivered")
    wait_for(stack.drained, 90, 0.3, "queues to drain")

    while_down = [a for a in first_round if a.sent_in == DOWN and a.answered_in == DOWN]
    after_recovery = [a for a in first_round if a.started > recovered.ended]
    books = ledger(fault_stub, accepted)
    dead = stack.redis.zcard("fr:dlq:index")
    fault_results.record(
        "Redis SIGKILL under traffic (append-only, fsync always), restarted after 10 answers while down",
        inputs=len(answers),
        status_5xx=sum(1 for a in answers if a.status and a.status >= 500),
        accepted=len(accepted),
        delivered=books.delivered,
        applied_twice=books.applied_twice,
        repeats=books.repeats,
        dead_lettered=dead,
        notes=(
            f"{len(first_round)} messages; answers while down: "
            f"{sorted({a.status for a in while_down})} x{len(while_down)}; /readyz down {ready_down}, "
            f"after {200 if ready_up else '?'}; {len(answers) - len(first_round)} mParticle retries; "
            f"first 2xx {recovered.ended - back_at:.2f} s after Redis was back; 2xx after that: "
            f"{sum(1 for a in after_recovery if a.ok)}/{len(after_recovery)}; "
            f"workers restarted by supervision: {len(restarts)}"
        ),
    )
    assert all(a.problem is None for a in answers), [a.problem for a in answers if a.problem][:5]
    # Redis down for the whole request: never 2xx for what could not be stored.
    assert len(while_down) >= 10 and {a.status for a in while_down} == {503}
    assert all(a.retry_after == "1" for a in answers if a.status == 503)
    assert ready_down == 503
    assert after_recovery and all(a.ok for a in after_recovery), (
        f"the web did not stay reconnected: {[(a.status, a.problem) for a in after_recovery if not a.ok][:5]}"
    )
    assert len(accepted) == len(first_round), "a message was never accepted, even after Redis came back"
    assert books.delivered == len(accepted), books.missing
    assert books.applied_twice == 0
    assert dead == 0
