"""Delivery under faults, with the real processes: gunicorn, two Celery workers, Redis and the
partner stub injecting faults. Every message gets a new apiKey of its own, so what the partner
received for it can be counted by Idempotency-Key (devtools.faults.ledger), and every key is a
secret the last test of the suite looks for in the logs.
"""

from __future__ import annotations

import email.utils
import signal
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from common import dead_letters
from common.keys import Keys
from devtools.faults import KIND_SAMPLES, Results, fresh_message, ledger, new_secret, post, sha
from devtools.procs import start_worker
from tests.support import Stub, wait_for
from tests.support.stack import Stack

KEYS = Keys("fr")
KINDS = list(KIND_SAMPLES)


def messages_for(test: str, count: int, secrets: dict[str, str], kinds: list[str] = KINDS) -> list[dict[str, Any]]:
    """`count` messages cycling through `kinds`, each with an apiKey of its own."""
    out = []
    for index in range(count):
        api_key = new_secret(f"ak_{test}")
        secrets[f"apiKey {test} #{index}"] = api_key
        out.append(fresh_message(kinds[index % len(kinds)], api_key))
    return out


def dead(stack: Stack, messages: list[dict[str, Any]]) -> int:
    return sum(dead_letters.get(stack.redis, KEYS, m["id"]) is not None for m in messages)


def all_delivered(stub: Stub, messages: list[dict[str, Any]]) -> bool:
    return ledger(stub, messages).delivered == len(messages)


def record_delivery(
    results: Results,
    label: str,
    books: Any,
    stack: Stack,
    messages: list[dict[str, Any]],
    statuses: dict[int, int],
    notes: str,
    inputs: int | None = None,
) -> None:
    """Record what the partner got for these messages as one row of the fault table.

    `inputs` counts the requests sent, when that is not one per message."""
    results.record(
        label,
        inputs=len(messages) if inputs is None else inputs,
        status_5xx=sum(n for s, n in statuses.items() if s >= 500),
        accepted=sum(n for s, n in statuses.items() if 200 <= s < 300),
        delivered=books.delivered,
        applied_twice=books.applied_twice,
        repeats=books.repeats,
        dead_lettered=dead(stack, messages),
        notes=notes,
    )


def test_partner_outage_then_recovery_delivers_everything_once(
    fault_stack: Stack, quiet_partner: Stub, fault_token: str, sent_secrets: dict[str, str], fault_results: Results
) -> None:
    """503 to every call for ~5 s while messages of every kind keep coming; then the partner recovers."""
    quiet_partner.faults([{"path_prefix": "/v1", "status": 503}])
    messages = messages_for("outage", 24, sent_secrets)
    statuses: Counter = Counter()
    outage_started = time.monotonic()
    for message in messages:
        statuses[post(fault_stack.url, message, fault_token).status_code] += 1
        time.sleep(0.1)
    # Every message met the outage at least once before it ends.
    wait_for(lambda: ledger(quiet_partner, messages).faulted >= len(messages) + 4, 30, 0.2, "every message refused")
    time.sleep(max(0.0, 5.0 - (time.monotonic() - outage_started)))
    outage = time.monotonic() - outage_started
    quiet_partner.faults([])
    wait_for(lambda: all_delivered(quiet_partner, messages), 90, 0.3, "every message delivered after recovery")
    wait_for(fault_stack.drained, 30, 0.2, "queues to drain")

    books = ledger(quiet_partner, messages)
    record_delivery(
        fault_results,
        f"Partner outage: 503 to every call for {outage:.0f} s, then recovery",
        books,
        fault_stack,
        messages,
        statuses,
        f"{books.faulted} partner calls refused during the outage; all four message types",
    )
    assert set(statuses) <= {200, 202}, statuses
    assert books.delivered == len(messages), books.missing
    assert books.applied_twice == 0 and books.repeats == 0
    assert quiet_partner.state()["duplicates"] == 0
    assert set(quiet_partner.state()["events"].values()) == {1}
    assert dead(fault_stack, messages) == 0


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_storm_no_call_for_the_key_before_retry_after(
    form: str,
    fault_stack: Stack,
    quiet_partner: Stub,
    fault_token: str,
    sent_secrets: dict[str, str],
    fault_results: Results,
) -> None:
    """Six 429s with Retry-After for one API key, in waves; another key is not held up.

    Each 429 is answered after 300 ms. From its answer (the stub's answered_at) until Retry-After
    has passed, the partner must see no call for that key but those the relay had already sent
    before it could know: never the throttled message again, and from the other messages at most
    one per other delivery slot. Judged by who sent what, not by a grace period after the answer,
    which a loaded machine stretches.
    """
    hold, throttles = 0.3, 6
    # Every call the relay has in flight takes one slot: each worker runs a pool of 2 (devtools/procs.py).
    slots = 2 * sum(1 for proc in fault_stack.workers if "worker" in proc.name)
    storm_key, calm_key = new_secret("ak_storm"), new_secret("ak_calm")
    sent_secrets[f"apiKey storm {form}"], sent_secrets[f"apiKey calm {form}"] = storm_key, calm_key
    if form == "seconds":
        retry_after, until_date = "1", None
    else:
        until_date = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
        retry_after = email.utils.format_datetime(until_date, usegmt=True)
    quiet_partner.faults(
        [
            {
                "path_prefix": "/v1/events",
                "status": 429,
                "retry_after": retry_after,
                "latency_ms": int(hold * 1000),
                "times": throttles,
                "api_key_sha256": sha(storm_key),
            }
        ]
    )
    kinds = ["event_processing_request"]
    first = fresh_message(kinds[0], storm_key)
    assert post(fault_stack.url, first, fault_token).status_code == 202

    def storm_calls() -> list[dict[str, Any]]:
        return sorted(
            (c for c in quiet_partner.requests("/v1") if c["api_key_sha256"] == sha(storm_key)),
            key=lambda c: c["received_at"],
        )

    wait_for(lambda: any(c["status"] == 429 for c in storm_calls()), 30, 0.05, "the first 429")
    storm = [fresh_message(kinds[0], storm_key) for _ in range(11)]
    calm = [fresh_message(kinds[0], calm_key) for _ in range(5)]
    statuses = Counter(post(fault_stack.url, m, fault_token).status_code for m in storm + calm)
    everything = [first, *storm, *calm]
    wait_for(lambda: all_delivered(quiet_partner, everything), 120, 0.2, "every message delivered")
    wait_for(fault_stack.drained, 60, 0.2, "queues to drain")

    calls = storm_calls()
    throttled = [c for c in calls if c["status"] == 429]

    def message_ids(call: dict[str, Any]) -> set[str]:
        return {batch["message_id"] for batch in (call["body"] or {}).get("batches", [])}

    # (the 429, its pause at the partner: from its answer until Retry-After has passed). The relay
    # learns of the 429 a little after answered_at and pauses from then, so its pause covers this.
    windows = []
    for call in throttled:
        answered = call["answered_at"]
        until = until_date.timestamp() if until_date else answered + float(retry_after)
        windows.append((call, answered, until))
    inside = [
        (throttle, [c for c in calls if answered < c["received_at"] < until]) for throttle, answered, until in windows
    ]
    # The throttled message's own retry is decided by the worker that got the 429: it always knows.
    retried_early = [
        (round(c["received_at"] - throttle["answered_at"], 3), sorted(message_ids(throttle)))
        for throttle, early in inside
        for c in early
        if message_ids(c) & message_ids(throttle)
    ]
    # Other messages' calls inside a pause can only be ones already sent when the 429 was answered:
    # one per other slot at most. A relay that ignored the pause would send many more.
    others_early = [len([c for c in early if not message_ids(c) & message_ids(throttle)]) for throttle, early in inside]
    calm_during_pause = sum(
        1
        for c in quiet_partner.requests("/v1")
        if c["api_key_sha256"] == sha(calm_key) and any(a < c["received_at"] < u for _, a, u in windows)
    )
    in_flight = sum(
        1
        for c in calls
        for call in throttled
        if c is not call and call["received_at"] <= c["received_at"] <= call["answered_at"]
    )
    gaps = [min((c["received_at"] - a for c in calls if c["received_at"] > a), default=None) for _, a, _ in windows]
    first_after = min((g for g in gaps if g is not None), default=0.0)
    books = ledger(quiet_partner, everything)
    fault_results.record(
        f"429 storm, Retry-After as {form}: {len(throttled)}x 429 for one API key",
        inputs=len(everything),
        status_5xx=sum(n for s, n in statuses.items() if s >= 500),
        accepted=1 + sum(n for s, n in statuses.items() if 200 <= s < 300),
        delivered=books.delivered,
        applied_twice=books.applied_twice,
        repeats=books.repeats,
        dead_lettered=dead(fault_stack, everything),
        notes=(
            f"calls for the key inside a pause: {sum(others_early) + len(retried_early)} (per 429: {others_early}); "
            f"first call after a 429's answer came {first_after:.2f} s later; "
            f"calls already on their way at a 429: {in_flight}; "
            f"the other key's calls during the pauses: {calm_during_pause}"
        ),
    )
    assert len(throttled) == throttles
    assert not retried_early, (
        f"a throttled message retried inside its pause (s after the 429's answer): {retried_early}"
    )
    assert max(others_early, default=0) <= slots - 1, (
        f"calls for the paused key inside a pause, per 429: {others_early}; only {slots - 1} can have been on their way"
    )
    assert calm_during_pause >= 1, "a 429 for one API key held up another"
    assert books.delivered == len(everything) and books.applied_twice == 0 and books.repeats == 0


def test_worker_sigkill_mid_deliveries_loses_nothing(
    fault_stack: Stack,
    quiet_partner: Stub,
    fault_token: str,
    sent_secrets: dict[str, str],
    fault_results: Results,
    logs_dir: Path,
) -> None:
    """Four partner calls in flight (two per worker); one worker's whole process group gets SIGKILL."""
    # Every call takes 2.5 s at the partner, which applies it anyway once the sleep is over.
    quiet_partner.faults([{"path_prefix": "/v1", "status": None, "latency_ms": 2500}])
    messages = messages_for("sigkill", 12, sent_secrets)
    statuses = Counter(post(fault_stack.url, m, fault_token).status_code for m in messages)

    def in_flight() -> list[dict[str, Any]]:
        return [c for c in quiet_partner.requests("/v1") if c["status"] is None]

    flying = wait_for(lambda: len(in_flight()) >= 4 and in_flight(), 30, 0.05, "four calls in flight")
    victim = fault_stack.workers.pop(0)
    victim.signal(signal.SIGKILL)  # main process and pool: no goodbye, no ack, no requeue
    victim.popen.wait(10)
    victim.stop()
    quiet_partner.faults([])
    fault_stack.workers.insert(0, start_worker("faults-worker-respawned", fault_stack.env, logs_dir))
    wait_for(lambda: all_delivered(quiet_partner, messages), 90, 0.3, "every message delivered")
    wait_for(fault_stack.drained, 30, 0.2, "queues to drain")

    books = ledger(quiet_partner, messages)
    record_delivery(
        fault_results,
        "Worker SIGKILL (whole process group) with 4 partner calls in flight",
        books,
        fault_stack,
        messages,
        statuses,
        f"{len(flying)} calls in flight at the kill; a new worker took over; repeats carry the same key",
    )
    assert books.delivered == len(messages), books.missing
    assert books.applied_twice == 0
    assert set(quiet_partner.state()["events"].values()) == {1}
    assert dead(fault_stack, messages) == 0


def test_mparticle_retries_and_concurrent_copies_are_delivered_once(
    fault_stack: Stack, quiet_partner: Stub, fault_token: str, sent_secrets: dict[str, str], fault_results: Results
) -> None:
    """Each message posted by 8 clients at once, then twice more, then once more after delivery."""
    messages = messages_for("retries", 8, sent_secrets)
    statuses: Counter = Counter()
    lock = threading.Lock()

    def send(body: dict[str, Any], barrier: threading.Barrier | None) -> None:
        with requests.Session() as session:
            if barrier is not None:
                barrier.wait(10)
            response = session.post(
                f"{fault_stack.url}/firehose",
                json=body,
                headers={"Authorization": f"Token {fault_token}"},
                timeout=10,
            )
        with lock:
            statuses[response.status_code] += 1

    for message in messages:
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=send, args=(message, barrier)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for _ in range(2):
            send(message, None)
    wait_for(lambda: all_delivered(quiet_partner, messages), 60, 0.2, "every message delivered")
    wait_for(fault_stack.drained, 30, 0.2, "queues to drain")
    calls_before = len(quiet_partner.requests("/v1"))
    for message in messages:  # mParticle retrying long after the first answer
        send(message, None)
    time.sleep(1.5)
    wait_for(fault_stack.drained, 30, 0.2, "queues to drain")

    books = ledger(quiet_partner, messages)
    record_delivery(
        fault_results,
        "mParticle retries: each message 8x concurrently, 2x again, 1x after delivery",
        books,
        fault_stack,
        messages,
        statuses,
        f"{len(messages)} distinct messages; {len(books.calls)} partner calls in all",
        inputs=sum(statuses.values()),
    )
    assert set(statuses) <= {200, 202}, statuses
    assert books.delivered == len(messages), books.missing
    assert books.applied_twice == 0 and books.repeats == 0
    assert len(quiet_partner.requests("/v1")) == calls_before == len(books.calls)
    assert quiet_partner.state()["duplicates"] == 0
