"""Every sample that carries an apiKey reaches the partner, through the real web, worker and stub,
with nothing dead-lettered, and every request the stub received follows the contract's JSON Schemas.

The samples: each fixture (tests/fixtures/messages) and, when this machine has it, each request of
the SDK's corpus (../shared/firehose-samples) that carries an `account.account_settings.apiKey` and
work (the others are refused at the door or are verification traffic: tests/unit/test_door_api_key.py).
Each is posted with a fresh id (the corpora share ids, and the door dedupes) and an apiKey of its
own, so what reached the partner can be told apart per sample; nothing else in it is changed.

One stack, all bodies posted at once, one bounded wait for the backlog to drain.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from devtools.partner_stub.state import ROUTE_SCHEMAS, load_validators
from schemas.envelope import carries_work
from schemas.messages import DSR, EVENTS, MEMBERSHIP, REGISTRATION, REQUEST_TYPES, SUBSCRIPTION
from tests.support import BATCHING_DB, SAMPLES, Stub, extra_corpus, own_stub, sample_id, wait_for
from tests.support.corpus import envelope, samples_where
from tests.support.stack import TOKEN, Stack, make_stack

# Every body, all partner calls, the whole drain: generous for a loaded 2-core machine, and still a
# bound (a stuck or endlessly retried message fails here rather than hanging the suite).
DRAIN_SECONDS = 120


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _deliverable(message: Any) -> bool:
    if not isinstance(message, dict) or message.get("type") not in REQUEST_TYPES - {REGISTRATION}:
        return False
    settings = (message.get("account") or {}).get("account_settings") or {}
    return bool(settings.get("apiKey")) and carries_work(message["type"], message)


SAMPLE_MESSAGES = samples_where(_deliverable)


@pytest.fixture(scope="module")
def partner(logs_dir: Path) -> Iterator[Stub]:
    # A stub of its own: no earlier test's requests or state in what this one checks.
    with own_stub(logs_dir, name="samples-stub") as stub:
        yield stub


@pytest.fixture(scope="module")
def stack(partner: Stub, logs_dir: Path) -> Iterator[Stack]:
    s = make_stack(BATCHING_DB, partner, logs_dir, "samples", workers=1, PARTNER_RATE_LIMIT="none")
    yield s
    s.stop()


def test_there_are_samples_of_every_kind() -> None:
    """The test below is no test without samples with an apiKey of each kind the corpora have."""
    kinds = {message["type"] for _, message in SAMPLE_MESSAGES}
    assert {EVENTS, SUBSCRIPTION} <= kinds
    fixtures = [path for path, _ in SAMPLE_MESSAGES if path.is_relative_to(SAMPLES)]
    assert len(fixtures) >= 30, f"expected the fixtures at {SAMPLES} (python -m devtools.make_fixtures)"
    if extra_corpus() is not None:
        assert len(SAMPLE_MESSAGES) > len(fixtures), "the SDK corpus is here, but none of its samples were taken"


def test_every_sample_with_an_api_key_reaches_the_partner(stack: Stack, partner: Stub) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    with requests.Session() as session:
        for index, (path, original) in enumerate(SAMPLE_MESSAGES):
            message = json.loads(json.dumps(original))
            message["id"] = str(uuid.uuid4())
            message["account"]["account_settings"]["apiKey"] = f"sample-{index}"
            response = session.post(
                f"{stack.url}/firehose",
                data=orjson.dumps(message),
                headers={"Authorization": f"Token {TOKEN}"},
                timeout=10,
            )
            assert response.status_code in (200, 202), f"{sample_id(path)}: {response.text}"
            sent.append((sample_id(path), message))

    wait_for(stack.drained, DRAIN_SECONDS, what="every sample delivered")

    # Nothing dead-lettered, nothing skipped at the door or dropped on the way.
    letters = stack.redis.zrange("fr:dlq:index", 0, -1)
    assert letters == [], f"dead-lettered: {letters[:5]}"

    state = partner.state()
    calls = partner.requests("/v1")
    by_key: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        by_key.setdefault(call["api_key_sha256"], []).append(call)
    for where, message in sent:
        key = sha(message["account"]["account_settings"]["apiKey"])
        kind = message["type"]
        assert by_key.get(key), f"{where}: no call reached the partner"
        if kind == EVENTS:
            delivered = state["events_by_api_key"].get(key, {})
            missing = [e["id"] for e in message.get("events") or [] if e.get("id") not in delivered]
            assert not missing, f"{where}: events not at the partner: {missing[:3]}"
        elif kind == SUBSCRIPTION:
            assert f"{key}:{message['audience_id']}" in state["audiences"], where
        elif kind in (MEMBERSHIP, DSR):  # only with an apiKey of their own (none of the samples so far)
            assert any(call["path"].startswith(("/v1/audiences", "/v1/users")) for call in by_key[key]), where

    # Every request the stub received followed the contract: the stub checks each body against its
    # route's JSON Schema and answers 400 when it does not, and no fault was injected here.
    assert calls, "the partner received nothing"
    refused = [(c["method"], c["path"], c["status"]) for c in calls if not 200 <= (c["status"] or 0) < 300]
    assert not refused, f"the stub refused: {refused[:5]}"
    # And again here, against the same schemas, so a stub running without jsonschema cannot pass it.
    validators = load_validators()
    assert validators is not None, "jsonschema (requirements-dev.txt) is needed to check the contract"
    for call in calls:
        route = _route(call["method"], call["path"])
        errors = validators[route].errors(call["body"])
        assert not errors, f"{call['method']} {call['path']}: {[e.message for e in errors[:3]]}"


def _route(method: str, path: str) -> str:
    """The stub's route name for a request (devtools/partner_stub/app.py), as ROUTE_SCHEMAS keys it."""
    if path == "/v1/events":
        route = "events"
    elif path == "/v1/users":
        route = "erasure"
    elif path.endswith("/members"):
        route = "audience_members"
    else:
        route = "audience"
    assert route in ROUTE_SCHEMAS, (method, path)
    return route


# ------------------------------------------- what reaches the partner, not shown elsewhere
# (consent and notifications: test_end_to_end.py; add-with-attributes, same-millisecond add then
# delete, member calls after a remove: test_audiences.py; poison: test_poison.py)


def _post(stack: Stack, message: dict[str, Any]) -> requests.Response:
    return requests.post(
        f"{stack.url}/firehose", data=orjson.dumps(message), headers={"Authorization": f"Token {TOKEN}"}, timeout=10
    )


def _envelope(kind: str, api_key: str, ts: int) -> dict[str, Any]:
    return envelope(kind, api_key, ts, account_id=31)


def test_numeric_strings_reach_the_partner_as_numbers(stack: Stack, partner: Stub) -> None:
    message = _envelope(EVENTS, "numeric-strings", 1_714_592_744_000)
    message["mpid"] = "42"
    message["events"] = [
        {
            "type": "product_action",
            "id": str(uuid.uuid4()),
            "timestamp_ms": 1_714_592_744_066,
            "session_id": "-1096377938905861812",  # beyond 2**53: exact
            "action": "purchase",
            "products": [{"id": "sku", "price": "10.00", "position": "1", "quantity": "2"}],
        }
    ]
    response = _post(stack, message)
    assert response.status_code == 202, response.text
    wait_for(stack.drained, 60, what="the batch delivered")
    [call] = [c for c in partner.requests("/v1/events") if c["api_key_sha256"] == sha("numeric-strings")]
    assert call["status"] == 202
    [event] = call["body"]["batches"][0]["events"]
    assert event["session_id"] == -1096377938905861812
    [product] = event["products"]
    assert (product["price"], product["position"], product["quantity"]) == (10.0, 1, 2)
    assert stack.redis.zcard("fr:dlq:index") == 0


def test_a_late_remove_does_not_delete_newer_members(stack: Stack, partner: Stub) -> None:
    """A subscription `remove` that arrives after newer member changes were acknowledged is not
    sent (it would delete them); one newer than every member change deletes the audience, and a
    member call from before it, arriving late, does not bring it back."""
    api_key, audience = "late-remove", 616
    key = f"{sha(api_key)}:{audience}"

    def members(ts: int, mpid: str) -> dict[str, Any]:
        message = _envelope(MEMBERSHIP, api_key, ts)
        entry = {"audience_id": audience, "audience_name": "Late", "action": "add"}
        message["user_profiles"] = [{"mpid": mpid, "audiences": [entry]}]
        return message

    def removal(ts: int) -> dict[str, Any]:
        message = _envelope(SUBSCRIPTION, api_key, ts)
        message.update(audience_id=audience, audience_name="Late", action="remove")
        return message

    for message in (members(5_000, "m1"), removal(3_000)):
        assert _post(stack, message).status_code == 200
        wait_for(stack.drained, 60, what=f"{message['type']} handled")
    assert not [c for c in partner.requests(f"/v1/audiences/{audience}") if c["method"] == "DELETE"]
    assert partner.state()["members"][key] == {"m1": {"attributes": {}}}

    for message in (removal(6_000), members(5_500, "m2")):
        assert _post(stack, message).status_code == 200
        wait_for(stack.drained, 60, what=f"{message['type']} handled")
    state = partner.state()
    assert state["audiences"][key]["deleted"] is True and key not in state["members"]
    assert stack.redis.zcard("fr:dlq:index") == 0
