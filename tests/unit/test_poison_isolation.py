"""One poison message never fails another: a member that cannot be planned, serialised or sent
is rejected alone, with its reason, and its neighbours in the same group are delivered."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from common import dead_letters
from service.dispatch import parse
from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import body, core_runtime, message, take_inbox
from workers.delivery import DeadReason
from workers.grouping import GROUP, plan_jobs
from workers.partner.base import Operation, OperationKind
from workers.partner.reference import ReferencePartnerClient
from workers.runtime import Runtime
from workers.tasks import run_attempt

API_KEY = "key-poison"


@pytest.fixture
def rt(partner: ScriptedPartnerClient) -> Runtime:
    return core_runtime(partner)


def too_deep_to_send() -> str:
    """An event batch the web accepts (254 levels) whose partner payload nests deeper than
    orjson writes: its event sits two levels lower there ({"batches": [{"events": [...]}]}).
    That event is skipped and counted (workers/repair.py); the rest of the batch is sent."""
    poison = message(api_key=API_KEY)
    poison["events"][0]["x_deep"] = "DEEP"
    lists = 254 - 3  # message, events list, event
    return body(poison).replace('"DEEP"', "[" * lists + "1" + "]" * lists)


def with_api_key(api_key: str) -> str:
    poison = message(api_key=API_KEY)
    poison["account"]["account_settings"]["apiKey"] = api_key
    return body(poison)


def letters(rt: Runtime) -> dict[str | None, str]:
    return {letter.message_id: letter.reason for letter in dead_letters.list_letters(rt.redis, rt.keys)}


def sent_ids(partner: ScriptedPartnerClient) -> list[str]:
    return [batch["message_id"] for op, _ in partner.calls for batch in op.payload["batches"]]


def test_the_poison_body_is_one_the_web_accepts() -> None:
    # 254 levels: the door lets it in (messages queued before it checked depth are worse still);
    # only its partner payload, two levels deeper, cannot be written.
    assert parse(too_deep_to_send().encode())["events"]


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (lambda: with_api_key("key\r\nX-Injected: 1"), DeadReason.INVALID_API_KEY),
        (lambda: with_api_key("ключ"), DeadReason.INVALID_API_KEY),
        (lambda: with_api_key("key\x01"), DeadReason.INVALID_API_KEY),
    ],
)
def test_a_poison_member_is_dead_lettered_alone_and_its_group_delivered(
    rt: Runtime, partner: ScriptedPartnerClient, poison: Any, reason: str
) -> None:
    neighbours = [body(message(api_key=API_KEY)) for _ in range(3)]
    bad = poison()
    bodies = [neighbours[0], bad, *neighbours[1:]]
    run_attempt(bodies, 1, None, grouped=True, rt=rt)
    assert len(partner.calls) == 1  # the neighbours, in one call, as before
    assert sent_ids(partner) == [orjson.loads(b)["id"] for b in neighbours]
    assert letters(rt) == {orjson.loads(bad)["id"]: reason}  # alone, permanent at once: no retry
    assert take_inbox(rt) == []


def test_a_poison_single_message_is_dead_lettered_not_retried(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    bad = with_api_key("key\nx")
    assert run_attempt([bad], 1, None, grouped=False, rt=rt) is None
    assert partner.calls == [] and take_inbox(rt) == []
    assert letters(rt) == {orjson.loads(bad)["id"]: DeadReason.INVALID_API_KEY}


def test_grouping_leaves_a_key_no_header_can_carry_alone() -> None:
    bodies = [body(message(api_key=API_KEY)), with_api_key("key\r\n"), body(message(api_key=API_KEY))]
    entries = [
        (f"{i + 1}-0".encode(), {b"body": b.encode(), b"type": b"event_processing_request"})
        for i, b in enumerate(bodies)
    ]
    jobs = plan_jobs(entries, max_messages=10, max_events=1000)
    assert [(job.task, len(job.bodies)) for job in jobs] == [("events", 2), ("single", 1)]
    assert jobs[1].bodies == [bodies[1]]


def test_an_unreadable_entry_goes_alone_and_never_fails_the_round() -> None:
    good = [body(message(api_key=API_KEY)) for _ in range(2)]
    entries = [
        (b"1-0", {b"body": good[0].encode(), b"type": b"event_processing_request"}),
        (b"2-0", {b"body": b"\xff\xfe", b"type": b"event_processing_request"}),
        (b"3-0", {b"body": b"{}", b"type": b"event_processing_request", b"attempt": b"two"}),
        (b"4-0", {b"body": b'{"not": "a list"}', b"type": GROUP.encode()}),
        (b"5-0", {b"body": good[1].encode(), b"type": b"event_processing_request"}),
    ]
    jobs = plan_jobs(entries, max_messages=10, max_events=1000)
    assert [(job.task, job.entry_ids) for job in jobs] == [
        ("events", [b"1-0", b"5-0"]),
        ("single", [b"2-0"]),
        ("single", [b"3-0"]),
        ("single", [b"4-0"]),
    ]


def test_an_event_too_deep_to_send_is_skipped_and_its_batch_sent_with_its_group(
    rt: Runtime, partner: ScriptedPartnerClient
) -> None:
    neighbours = [body(message(api_key=API_KEY)) for _ in range(3)]
    bad = too_deep_to_send()
    run_attempt([neighbours[0], bad, *neighbours[1:]], 1, None, grouped=True, rt=rt)
    assert len(partner.calls) == 1
    assert sent_ids(partner) == [orjson.loads(b)["id"] for b in [neighbours[0], bad, *neighbours[1:]]]
    [(op, _)] = partner.calls
    assert [len(batch["events"]) for batch in op.payload["batches"]] == [2, 1, 2, 2]
    assert letters(rt) == {} and take_inbox(rt) == []
    assert rt.redis.hget(rt.keys.skipped_events, "unserialisable") == b"1"


def test_replay_all_does_not_take_the_neighbours_down_again(rt: Runtime, partner: ScriptedPartnerClient) -> None:
    # Letters of a group that failed together before this fix: the poison one among them.
    neighbours = [body(message(api_key=API_KEY)) for _ in range(3)]
    bad = too_deep_to_send()
    for b in [neighbours[0], bad, *neighbours[1:]]:
        parsed = orjson.loads(b)
        dead_letters.add(
            rt.redis,
            rt.keys,
            b,
            reason="internal_error",
            message_id=parsed["id"],
            account_id=4242,
            message_type=parsed["type"],
            attempts=1,
        )
    for letter in dead_letters.list_letters(rt.redis, rt.keys):
        assert dead_letters.replay(rt.redis, rt.keys, letter.id)
    jobs = plan_jobs(take_inbox(rt), max_messages=10, max_events=1000)
    for job in jobs:
        run_attempt(job.bodies, job.attempt, None, grouped=job.task == "events", rt=rt)
    # The poison one too, without its event that cannot be written.
    assert sorted(sent_ids(partner)) == sorted(orjson.loads(b)["id"] for b in [*neighbours, bad])
    assert letters(rt) == {}


def test_the_reference_client_never_sends_nor_raises_on_such_a_key() -> None:
    client = ReferencePartnerClient("http://127.0.0.1:9", timeout=0.5)  # nothing listens: no call is made
    for api_key in ("key\r\nX: 1", "ключ", "key\x00"):
        result = client.send(Operation(OperationKind.EVENTS, {"batches": []}, api_key, message_id="m"), "k")
        assert result.status == 400 and result.error is not None and "invalid_api_key" in result.error


def test_idempotency_keys_of_serialisable_work_are_unchanged() -> None:
    # The key is a hash of kind, audience, message id and the canonical payload, as pinned
    # elsewhere; the poison handling only adds a rejection around it.
    op = Operation(OperationKind.EVENTS, {"batches": [{"a": 1}]}, API_KEY, message_id="m")
    digest = hashlib.sha256(b"events\nNone\nm\n" + orjson.dumps(op.payload, option=orjson.OPT_SORT_KEYS))
    assert op.idempotency_key() == digest.hexdigest()
