"""One poison message never takes its neighbours, through the real stack: gunicorn, two Celery
workers with the pump, the partner stub. Poison messages are posted among ordinary event batches
for the same API key, close enough together to be grouped into one partner call; every neighbour
arrives, and each poison one is refused at the door (400) or dead-lettered alone with its reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests

from common import dead_letters
from tests.support import BATCHING_DB, Stub, own_stub, sample, wait_for
from tests.support.stack import KEYS, TOKEN, Stack, all_event_ids, delivered_events, make_stack

API_KEY = "poison-neighbour-key"
AUTH = {"Authorization": f"Token {TOKEN}"}


@pytest.fixture(scope="module")
def stub(logs_dir: Path) -> Iterator[Stub]:
    with own_stub(logs_dir, name="poison-stub") as client:
        yield client


@pytest.fixture(scope="module")
def stack(stub: Stub, logs_dir: Path) -> Iterator[Stack]:
    # Calls wait for company (300 ms), so the messages below share them, poison and all.
    s = make_stack(
        BATCHING_DB, stub, logs_dir, "poison", workers=2, DELIVERY_BATCH_WAIT_MS="300", DELIVERY_BATCH_MAX_MESSAGES="20"
    )
    try:
        yield s
    finally:
        s.stop()


def batch(api_key: str = API_KEY) -> dict:
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = str(uuid.uuid4())
    message["account"]["account_settings"]["apiKey"] = api_key
    template = message["events"][0]
    message["events"] = [dict(template, id=str(uuid.uuid4())) for _ in range(2)]
    return message


def nested_in_first_event(message: dict, lists: int) -> bytes:
    """The message with `lists` nested lists in its first event: message, events and event are
    three levels, so 251 make a body of 254 (the web takes it) whose event, two levels deeper in
    the partner payload, no JSON writer with orjson's 254-level limit can write."""
    message["events"][0]["x_deep"] = "DEEP"
    return orjson.dumps(message).replace(b'"DEEP"', b"[" * lists + b"1" + b"]" * lists)


def test_poison_and_its_neighbours_posted_together(stack: Stack, stub: Stub) -> None:
    session = requests.Session()

    def post(body: bytes) -> requests.Response:
        return session.post(f"{stack.url}/firehose", data=body, headers=AUTH, timeout=10)

    neighbours: list[dict] = []
    deep = batch()
    refused: dict[str, requests.Response] = {}
    for round_ in range(3):
        for _ in range(4):
            neighbours.append(batch())
            assert post(orjson.dumps(neighbours[-1])).status_code == 202
        if round_ == 0:
            # Accepted: the web cannot tell without planning it; the worker skips that event alone.
            assert post(nested_in_first_event(deep, 251)).status_code == 202
        elif round_ == 1:
            refused["too deep"] = post(nested_in_first_event(batch(), 254))
            refused["CR/LF apiKey"] = post(orjson.dumps(batch(API_KEY + "\r\nX-Injected: 1")))
            refused["non-Latin-1 apiKey"] = post(orjson.dumps(batch("ключ-" + API_KEY)))
            refused["float mpid"] = post(orjson.dumps(batch() | {"mpid": 1.5e18}))
        else:
            # Shape problems the worker skips and counts: the message itself is delivered.
            shaped = batch() | {"user_attributes": {"bad": [1], "ok": "yes"}, "source_channel": 3}
            shaped["events"][0] = dict(shaped["events"][0], session_id="123")
            neighbours.append(shaped)
            assert post(orjson.dumps(shaped)).status_code == 202

    for what, response in refused.items():
        assert response.status_code == 400, what
        assert response.json()["error"]["code"] in ("invalid_json", "invalid_envelope"), what
    assert "apiKey" in str(refused["CR/LF apiKey"].json()["error"]["fields"])
    assert "mpid" in refused["float mpid"].json()["error"]["fields"]

    # Every neighbour's events, and the deep batch's other event: only the deep one never arrives.
    wanted = all_event_ids(neighbours) | {deep["events"][1]["id"]}
    wait_for(lambda: wanted <= set(delivered_events(stub, API_KEY)), 90, 0.2, "every neighbour's events")
    wait_for(stack.drained, 60, 0.3, "the stack to drain")
    assert set(delivered_events(stub, API_KEY)) == wanted
    assert list(dead_letters.list_letters(stack.redis, KEYS)) == []
    skipped = {k.decode(): int(v) for k, v in stack.redis.hgetall(KEYS.skipped_events).items()}
    assert skipped.get("invalid:user_attributes") == 1 and skipped.get("invalid:source_channel") == 1
    assert skipped.get("unserialisable") == 1
