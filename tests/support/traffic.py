"""mParticle posting steadily to a web under a Redis fault, as the fault tests drive it
(tests/e2e/faults/test_redis_restart.py, test_failover.py): a ledger of every answer, mParticle's
retries of what was not answered 2xx, and the wait for everything answered 2xx to be delivered."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis as redis_lib
import requests

from devtools.faults import KIND_SAMPLES, Results, error_shape_problem, fresh_message, ledger, new_secret
from tests.support import Stub, wait_for

KINDS = list(KIND_SAMPLES)


@dataclass
class Answer:
    message: dict[str, Any]
    status: int | None
    started: float  # on the traffic's clock
    ended: float
    problem: str | None  # what is wrong with the answer itself, whatever Redis was doing
    sent_in: str  # the test's phase when the request was sent, and when it was answered
    answered_in: str

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Traffic:
    """A thread posting a fresh message of each kind in turn, each with an apiKey of its own (added to
    `secrets`, which no log may hold), until stopped; every answer lands in `answers`.

    `phase` is the test's to set: each answer records the phase its request was sent and answered in,
    so a test can judge answers by what Redis was doing rather than by a clock window that a loaded
    machine stretches. `clock` stamps started/ended (time.time where they are compared with the
    partner stub's wall-clock times)."""

    def __init__(
        self,
        url: str,
        token: str,
        secrets: dict[str, str],
        label: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.secrets = secrets
        self.label = label
        self.clock = clock
        self.phase = ""
        self.answers: list[Answer] = []
        self.first_round: list[Answer] = []
        self._session = requests.Session()
        self._headers = {"Authorization": f"Token {token}"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{label}")

    def send(self, message: dict[str, Any]) -> Answer:
        sent_in, started = self.phase, self.clock()
        try:
            # A client timeout far above any answer the web gives (a refused Redis connection is
            # immediate): a request that still gets no answer is a hang, not a slow machine.
            response = self._session.post(
                f"{self.url}/firehose", data=orjson.dumps(message), headers=self._headers, timeout=20
            )
            status, problem = response.status_code, None
            if status >= 400 and status != 503:
                problem = f"{status}: {response.text[:200]}"
            elif status == 503:
                # 503 is the one refusal Redis's absence may cause: still the JSON error shape, and
                # mParticle told to come back in a second.
                problem = error_shape_problem(400, response.headers.get("Content-Type"), response.content)
                if problem is None and response.headers.get("Retry-After") != "1":
                    problem = f"503 with Retry-After {response.headers.get('Retry-After')!r}, not '1'"
        except requests.RequestException as exc:
            status, problem = None, f"no answer: {type(exc).__name__}"
        answer = Answer(message, status, started, self.clock(), problem, sent_in, self.phase)
        self.answers.append(answer)
        return answer

    def _run(self) -> None:
        for index in range(5000):  # the cap only bounds a run gone wrong
            if self._stop.is_set():
                return
            api_key = new_secret(f"ak_{self.label}")
            self.secrets[f"apiKey {self.label} #{index}"] = api_key
            self.send(fresh_message(KINDS[index % len(KINDS)], api_key))
            time.sleep(0.03)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread; what was answered by then is the first round, before any retry."""
        self._stop.set()
        self._thread.join(60)
        self.first_round = list(self.answers)

    def ok_count(self, keep: Callable[[Answer], bool] = lambda a: True) -> int:
        return sum(1 for a in list(self.answers) if a.ok and keep(a))

    def answered(self, sent_in: str, answered_in: str) -> list[Answer]:
        return [a for a in list(self.answers) if a.sent_in == sent_in and a.answered_in == answered_in]

    def retry_until_accepted(self, tries: int = 20) -> None:
        """As mParticle does: send again what the first round did not get a 2xx for, until it does (bounded)."""
        for answer in self.first_round:
            if answer.ok:
                continue
            for _ in range(tries):
                if self.send(answer.message).ok:
                    break
                time.sleep(0.2)

    def accepted(self) -> list[dict[str, Any]]:
        """Every message answered 2xx at least once, each once."""
        ids = {a.message["id"] for a in self.answers if a.ok}
        return [m for m in {a.message["id"]: a.message for a in self.answers}.values() if m["id"] in ids]

    def problems(self) -> list[str]:
        return [a.problem for a in self.answers if a.problem]

    def status_5xx(self) -> int:
        return sum(1 for a in self.answers if a.status and a.status >= 500)


def wait_all_delivered(
    stub: Stub, accepted: list[dict[str, Any]], seconds: float, also: Callable[[], None] | None = None
) -> None:
    """Until the partner has every message of `accepted`; on timeout, fails naming the ids still
    missing (for the logs: web, worker, stub). `also` runs on each poll: a check that should fail the
    wait at once rather than at its deadline."""
    missing: list[str] = []

    def delivered() -> bool:
        if also is not None:
            also()
        books = ledger(stub, accepted)
        missing[:] = books.missing
        return books.delivered == len(accepted)

    try:
        wait_for(delivered, seconds, 0.5, "every 2xx delivered")
    except AssertionError as exc:
        if not str(exc).startswith("timed out"):
            raise  # what `also` found
        names = f"{len(missing)} of {len(accepted)} never reached the partner: {missing[:10]}"
        raise AssertionError(f"{exc}; {names}") from None


def record_and_check_delivery(
    results: Results, fault: str, traffic: Traffic, stub: Stub, redis_client: redis_lib.Redis, notes: str
) -> None:
    """Records the fault's figures, then asserts what holds after any fault: every answer well formed,
    every message accepted in the end, and each delivered once with nothing dead-lettered. Call it
    after the test's own waits, and before its own asserts, so the figures are there even when one fails."""
    accepted = traffic.accepted()
    books = ledger(stub, accepted)
    dead = int(redis_client.zcard("fr:dlq:index"))
    results.record(
        fault,
        inputs=len(traffic.answers),
        status_5xx=traffic.status_5xx(),
        accepted=len(accepted),
        delivered=books.delivered,
        applied_twice=books.applied_twice,
        repeats=books.repeats,
        dead_lettered=dead,
        notes=notes,
    )
    # Every 503 was checked as it came: the JSON error shape and Retry-After: 1.
    assert not traffic.problems(), traffic.problems()[:5]
    assert len(accepted) == len(traffic.first_round), "a message was never accepted, even after the fault ended"
    assert books.delivered == len(accepted), books.missing
    assert books.applied_twice == 0
    assert dead == 0
