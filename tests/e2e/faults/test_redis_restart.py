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


@dataclass
class Answer:
    message: dict[str, Any]
    status: int | None
    started: float
    ended: float
    problem: str | None
    retry_after: str | None


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
    stop = threading.Event()
    session = requests.Session()
    headers = {"Authorization": f"Token {fault_token}"}

    def send(message: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            response = session.post(f"{stack.url}/firehose", data=orjson.dumps(message), headers=headers, timeout=5)
            status, problem = response.status_code, None
            if status >= 400 and status != 503:
                problem = f"{status}: {response.text[:200]}"
            elif status == 503:
                problem = error_shape_problem(400, response.headers.get("Content-Type"), response.content)
            retry_after = response.headers.get("Retry-After")
        except requests.RequestException as exc:
            status, problem, retry_after = None, f"no answer: {type(exc).__name__}", None
        answers.append(Answer(message, status, started, time.monotonic(), problem, retry_after))

    def traffic() -> None:
        deadline = time.monotonic() + 30
        for index in range(400):
            if stop.is_set() or time.monotonic() > deadline:
                return
            api_key = new_secret("ak_restart")
            sent_secrets[f"apiKey restart #{index}"] = api_key
            send(fresh_message(KINDS[index % len(KINDS)], api_key))
            time.sleep(0.03)

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(2)
    server.kill()
    down_at = time.monotonic()
    time.sleep(0.5)
    ready_down = requests.get(f"{stack.url}/readyz", timeout=5).status_code
    time.sleep(2.5)
    up_at = time.monotonic()
    server.start()
    time.sleep(3)
    stop.set()
    thread.join(30)
    ready_up = wait_for(
        lambda: requests.get(f"{stack.url}/readyz", timeout=5).status_code == 200, 20, 0.2, "/readyz after restart"
    )

    # mParticle sends again what was not answered 2xx, until it is (bounded).
    first_round = list(answers)
    for answer in first_round:
        if answer.status is not None and 200 <= answer.status < 300:
            continue
        for _ in range(20):
            send(answer.message)
            if answers[-1].status is not None and 200 <= answers[-1].status < 300:
                break
            time.sleep(0.2)

    accepted_ids = {a.message["id"] for a in answers if a.status and 200 <= a.status < 300}
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

    wait_for(all_delivered, 120, 0.5, "every 2xx delivered")
    wait_for(stack.drained, 60, 0.3, "queues to drain")

    while_down = [a for a in first_round if a.started > down_at and a.ended < up_at]
    after_up = [a for a in first_round if a.started > up_at + 1.0]
    books = ledger(fault_stub, accepted)
    dead = stack.redis.zcard("fr:dlq:index")
    fault_results.record(
        "Redis SIGKILL under traffic (append-only, fsync always), restarted after 3 s",
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
            f"2xx after restart: {sum(1 for a in after_up if a.status and a.status < 300)}/{len(after_up)}; "
            f"workers restarted by supervision: {len(restarts)}"
        ),
    )
    assert all(a.problem is None for a in answers), [a.problem for a in answers if a.problem][:5]
    assert len(while_down) >= 10 and {a.status for a in while_down} == {503}
    assert all(a.retry_after == "1" for a in answers if a.status == 503)
    assert ready_down == 503
    assert after_up and all(a.status and a.status < 300 for a in after_up), "the web did not reconnect by itself"
    assert len(accepted) == len(first_round), "a message was never accepted, even after Redis came back"
    assert books.delivered == len(accepted), books.missing
    assert books.applied_twice == 0
    assert dead == 0
