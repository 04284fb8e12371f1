"""Audiences end to end: subscriptions, membership that converges under failures and
reordering, dead credentials, erasure. Real Redis, gunicorn, two worker processes, the stub.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests

from tests.support import AUDIENCES_DB, SAMPLES, Stub, extra_corpus, sample, sample_id, wait_for
from tests.support.stack import TOKEN, Stack, make_stack

AUDIENCES = (101, 202, 303)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def post(stack: Stack, message: dict) -> requests.Response:
    return requests.post(
        f"{stack.url}/firehose", data=orjson.dumps(message), headers={"Authorization": f"Token {TOKEN}"}, timeout=10
    )


def envelope(kind: str, api_key: str, ts: int, account_id: int = 777) -> dict:
    return {
        "type": kind,
        "id": str(uuid.uuid4()),
        "timestamp_ms": ts,
        "firehose_version": "3.2.0",
        "account": {"account_id": account_id, "account_settings": {"apiKey": api_key}},
    }


def membership(api_key: str, ts: int, changes: list[tuple[str, int, str]], account_id: int = 777) -> dict:
    """changes: (mpid, audience_id, action)"""
    profiles: dict[str, list[dict]] = {}
    for mpid, audience_id, action in changes:
        profiles.setdefault(mpid, []).append(
            {"audience_id": audience_id, "audience_name": f"aud {audience_id}", "action": action}
        )
    message = envelope("audience_membership_change_request", api_key, ts, account_id)
    message["user_profiles"] = [{"mpid": mpid, "audiences": audiences} for mpid, audiences in profiles.items()]
    return message


@pytest.fixture(scope="module")
def stack(stub: Stub, logs_dir: Path) -> Iterator[Stack]:
    s = make_stack(
        AUDIENCES_DB, stub, logs_dir, "audiences", workers=2, PARTNER_RATE_LIMIT="none", RETRY_MAX_ATTEMPTS="12"
    )
    yield s
    s.stop()


@pytest.fixture
def partner(stack: Stack, stub: Stub) -> Stub:
    return stack.quiet(stub)


def test_membership_converges_to_the_newest_change(stack: Stack, partner: Stub) -> None:
    api_key = "converge-key"
    rng = random.Random(11)
    partner.faults([{"path_prefix": "/v1/audiences", "status": 503, "probability": 0.25, "seed": 5}])
    users = [str(-(2**62) + i) for i in range(40)]
    base = 1_764_000_000_000
    messages, newest = [], {}
    for round_ in range(4):
        rng.shuffle(users)
        for chunk_start in range(0, len(users), 8):
            ts = base + round_ * 10_000 + chunk_start
            changes = [
                (mpid, audience, rng.choice(["add", "delete", "add"]))
                for mpid in users[chunk_start : chunk_start + 8]
                for audience in AUDIENCES
            ]
            messages.append(membership(api_key, ts, changes))
            for mpid, audience, action in changes:
                newest[(mpid, audience)] = action
    # mParticle's retries and parallel senders: older changes may arrive after newer ones.
    rng.shuffle(messages)
    with ThreadPoolExecutor(6) as pool:
        assert {r.status_code for r in pool.map(lambda m: post(stack, m), messages)} == {200}
    wait_for(stack.drained, 120, what="every membership change handled")

    members = partner.state()["members"]
    for audience in AUDIENCES:
        expected = {mpid for (mpid, aud), action in newest.items() if aud == audience and action == "add"}
        actual = set(members.get(f"{sha(api_key)}:{audience}", {}))
        if actual != expected:
            user = sorted(actual ^ expected)[0]
            trail = [
                (c["seq"], c["status"], ch["action"], ch["timestamp_ms"] - base)
                for c in partner.requests(f"/v1/audiences/{audience}/members")
                for ch in (c["body"] or {}).get("changes", [])
                if ch["user"]["mpid"] == user
            ]
            sent = sorted(
                (m["timestamp_ms"] - base, a["action"])
                for m in messages
                for p in m["user_profiles"]
                if p["mpid"] == user
                for a in p["audiences"]
                if a["audience_id"] == audience
            )
            raise AssertionError(
                f"audience {audience}: {len(actual ^ expected)} users differ; {user}: sent {sent}, stub saw {trail}"
            )
    calls = partner.requests("/v1/audiences")
    assert any(c["status"] == 503 for c in calls), "the stub was meant to fail some calls"
    assert not [m["id"] for m in messages if dead_lettered(stack, m)]


def dead_lettered(stack: Stack, message: dict) -> bool:
    """Whether the message has a dead letter: the index names letters `<account>:<message id>`."""
    suffix = f":{message['id']}".encode()
    return any(ref.endswith(suffix) for ref in stack.redis.zrange("fr:dlq:index", 0, -1))


def test_subscription_creates_updates_and_removes(stack: Stack, partner: Stub) -> None:
    api_key = "subscription-key"
    for action, ts in (("add", 1), ("update", 2)):
        message = envelope("audience_subscription_request", api_key, ts)
        message.update(audience_id=909, audience_name=f"Loyal ({action})", action=action)
        answer = post(stack, message)
        assert answer.status_code == 200
        # The partner's list key comes back for mParticle to store, computed without a partner call.
        assert answer.json()["audience_subscription_settings"] == {"partnerAudienceId": "909"}
    # Workers may take the two in either order; a late `add` is dropped, never applied last.
    audience_key = f"{sha(api_key)}:909"
    wait_for(
        lambda: partner.state()["audiences"].get(audience_key, {}).get("name") == "Loyal (update)",
        30,
        what="the update to be the audience's state",
    )
    assert not partner.state()["audiences"][audience_key]["deleted"]
    removal = envelope("audience_subscription_request", api_key, 3)
    removal.update(audience_id=909, audience_name="Loyal", action="remove")
    assert post(stack, removal).status_code == 200
    wait_for(lambda: partner.state()["audiences"][audience_key]["deleted"], 30, what="the removal")


def test_rejected_credentials_suspend_the_subscription(stack: Stack, partner: Stub) -> None:
    account = 31337
    partner.faults([{"path_prefix": "/v1/audiences", "status": 401, "api_key_sha256": sha("revoked-key")}])
    rejected = membership("revoked-key", 5, [("1", 101, "add")], account)
    answer = post(stack, rejected).json()
    assert answer["suspend_subscription"] is False
    wait_for(lambda: dead_lettered(stack, rejected), 30, what="the dead letter")

    verification = envelope("audience_membership_change_request", "revoked-key", 6, account)
    assert post(stack, verification).json()["suspend_subscription"] is True
    # A change with profiles asks in the same Redis round trip as its store; a retry of it too.
    again = membership("revoked-key", 8, [("2", 101, "add")], account)
    assert post(stack, again).json()["suspend_subscription"] is True
    assert post(stack, again).json()["suspend_subscription"] is True
    # The customer fixes the key in mParticle: the next message carries a new one.
    fixed = membership("fixed-key", 7, [("1", 101, "add")], account)
    assert post(stack, fixed).json()["suspend_subscription"] is False
    wait_for(lambda: partner.state()["members"].get(f"{sha('fixed-key')}:101"), 30, what="delivery with the new key")


def test_erasure_reaches_the_partner_as_a_deletion(stack: Stack, partner: Stub) -> None:
    message = orjson.loads(sample("3.2.0", "DsrProcessingRequest.json"))
    message["id"] = str(uuid.uuid4())
    message["account"] = {"account_id": 777, "account_settings": {"apiKey": "dsr-key"}}
    assert post(stack, message).json()["type"] == "dsr_processing_response"
    [erased] = wait_for(lambda: partner.state()["erased"], 30, what="the erasure")
    assert erased["request_id"] == message["subject_request_id"]
    # Named as events carry them (docs/partner-api.md, "Erasure"), not as OpenDSR does.
    assert {(i["type"], i["encoding"]) for i in erased["identities"]} == {
        ("google_advertising_id", "raw"),
        ("email", "sha256"),
    }
    [call] = partner.requests("/v1/users")
    assert call["method"] == "DELETE"


# One membership sample per format (1.x lists, 2.0 actions, today's): the fixtures always, the
# shared SDK corpus's as well when this machine has it.
MEMBERSHIP_SAMPLES = [
    corpus / version / "AudienceMembershipChangeRequest.json"
    for corpus in [SAMPLES, extra_corpus()]
    if corpus is not None
    for version in ("3.2.0", "2.0.0", "1.x-unversioned")
]


@pytest.mark.parametrize("path", MEMBERSHIP_SAMPLES, ids=[sample_id(p) for p in MEMBERSHIP_SAMPLES])
def test_membership_samples_are_delivered(stack: Stack, partner: Stub, path: Path) -> None:
    message = orjson.loads(path.read_bytes())
    message["id"] = str(uuid.uuid4())
    # Its own key per case, so no case can see members another one delivered.
    api_key = f"sample-{sample_id(path)}"
    message["account"]["account_settings"]["apiKey"] = api_key
    assert post(stack, message).status_code == 200
    # Within one message the last change for a user counts (the 1.x sample adds and removes
    # the same user in two profiles).
    final: dict[tuple[int, str], str] = {}
    for profile in message["user_profiles"]:
        user = profile.get("mpid") or profile["user_identities"][0]["value"]
        actions = [(a, a.get("action")) for a in profile.get("audiences", [])]
        actions += [(a, "add") for a in profile.get("added_audiences", [])]
        actions += [(a, "delete") for a in profile.get("removed_audiences", [])]
        for audience, action in actions:
            if action in ("add", "delete"):
                final[(audience["audience_id"], user)] = action
    expected_adds = {audience_id for (audience_id, _), action in final.items() if action == "add"}
    assert expected_adds
    wait_for(lambda: stack.drained() and partner.requests("/v1/audiences"), 30, what="the member calls")
    members = partner.state()["members"]
    for audience_id in expected_adds:
        assert members.get(f"{sha(api_key)}:{audience_id}"), (sample_id(path), audience_id)
    assert stack.redis.zscore("fr:dlq:index", message["id"]) is None


# ------------------------------------------------ audience semantics, through web, workers and stub


def _entry(audience_id: int, action: str, attributes: list[dict] | None = None) -> dict:
    entry: dict = {
        "audience_id": audience_id,
        "audience_name": "Semantics",
        "audience_subscription_settings": {"partnerAudienceId": f"list-{audience_id}"},
        "action": action,
    }
    if attributes is not None:
        entry["user_attributes"] = attributes
    return entry


def _profiles(api_key: str, ts: int, profiles: list[tuple[str, list[dict]]]) -> dict:
    message = envelope("audience_membership_change_request", api_key, ts)
    message["user_profiles"] = [{"mpid": mpid, "audiences": audiences} for mpid, audiences in profiles]
    return message


def _delivered(stack: Stack, message: dict) -> None:
    """Posted, then handled: the next message of the test is newer in arrival order."""
    assert post(stack, message).status_code == 200
    wait_for(stack.drained, 30, what=f"message {message['id']} handled")
    assert stack.redis.zscore("fr:dlq:index", message["id"]) is None


def test_audience_semantics_reach_the_partner(stack: Stack, partner: Stub) -> None:
    api_key = "semantics-key"
    audience_key = f"{sha(api_key)}:515"
    tier = [{"key": "tier", "value": "silver", "action": "upsert"}]
    update = [
        {"key": "tier", "value": "gold", "action": "upsert"},
        {"key": "city", "value": "Oslo", "action": "upsert"},
    ]
    subscription = envelope("audience_subscription_request", api_key, 1_000)
    subscription.update(
        audience_id=515,
        audience_name="Semantics",
        action="update",
        audience_subscription_settings={"partnerAudienceId": "list-515"},
        previous_audience_subscription_settings={"partnerAudienceId": "list-old"},
    )
    _delivered(stack, subscription)
    [put] = partner.requests("/v1/audiences/515")
    assert put["body"]["previous_settings"] == {"partnerAudienceId": "list-old"}

    # Added and updated in one message: a member with the attributes. Attributes on a bare add too.
    _delivered(
        stack,
        _profiles(
            api_key,
            2_000,
            [
                ("s1", [_entry(515, "add", tier), _entry(515, "attribute_update", update)]),
                ("s2", [_entry(515, "add", tier)]),
            ],
        ),
    )
    members = partner.state()["members"][audience_key]
    assert members == {"s1": {"attributes": {"tier": "gold", "city": "Oslo"}}, "s2": {"attributes": {"tier": "silver"}}}
    member_call = partner.requests("/v1/audiences/515/members")[-1]["body"]
    assert member_call["audience"] == {"name": "Semantics", "settings": {"partnerAudienceId": "list-515"}}

    # A delete in the same millisecond as the add that went before it: the user leaves.
    _delivered(stack, _profiles(api_key, 2_000, [("s2", [_entry(515, "delete")])]))
    assert set(partner.state()["members"][audience_key]) == {"s1"}

    # The customer removes the audience; a late member call from before the removal is not sent.
    removal = envelope("audience_subscription_request", api_key, 3_000)
    removal.update(audience_id=515, audience_name="Semantics", action="remove")
    _delivered(stack, removal)
    calls = len(partner.requests("/v1/audiences/515"))
    _delivered(stack, _profiles(api_key, 2_500, [("s3", [_entry(515, "add")])]))
    assert len(partner.requests("/v1/audiences/515")) == calls
    state = partner.state()
    assert state["audiences"][audience_key]["deleted"] is True and audience_key not in state["members"]

    # A member change newer than the removal creates the audience again.
    _delivered(stack, _profiles(api_key, 4_000, [("s4", [_entry(515, "add")])]))
    state = partner.state()
    assert state["audiences"][audience_key]["deleted"] is False
    assert state["members"][audience_key] == {"s4": {"attributes": {}}}


def _user_events(api_key: str, mpid: str, email: str, gaid: str) -> dict:
    """An event batch as mParticle sends it under our registration: email as sha256 of the
    trimmed, lower-cased address, the Google advertising id raw."""
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_android.json"))
    message["id"] = str(uuid.uuid4())
    message["account"]["account_settings"]["apiKey"] = api_key
    message["mpid"] = mpid
    message["user_identities"] = [{"type": "email", "encoding": "sha256", "value": sha(email.strip().lower())}]
    message["runtime_environment"]["identities"] = [{"type": "google_advertising_id", "encoding": "raw", "value": gaid}]
    template = message["events"][0]
    message["events"] = [dict(template, id=str(uuid.uuid4())) for _ in range(3)]
    return message


def test_an_erasure_in_opendsr_form_finds_and_erases_the_users_events(stack: Stack, partner: Stub) -> None:
    api_key = "erase-e2e-key"
    jane = _user_events(api_key, "-5227515829034156637", "jane.doe@example.com", "84aae47d-d376-4a35-bde5-c0ee5a808bd3")
    john = _user_events(api_key, "42", "john@example.com", "11111111-2222-3333-4444-555555555555")
    for message in (jane, john):
        assert post(stack, message).status_code == 202
    jane_ids, john_ids = ({e["id"] for e in m["events"]} for m in (jane, john))
    wait_for(
        lambda: jane_ids | john_ids <= set(partner.state()["events_by_api_key"].get(sha(api_key), {})),
        30,
        what="both users' events",
    )

    # mParticle's form: OpenDSR names, raw values (the address as the subject typed it).
    erasure = envelope("dsr_processing_request", api_key, 1_714_592_745_000)
    erasure.update(
        subject_request_id=str(uuid.uuid4()),
        subject_request_type="erasure",
        submitted_time="2024-05-01T19:45:44.067Z",
        subject_identities={
            "email": {"encoding": "raw", "value": " Jane.Doe@Example.com "},
            "android_advertising_id": {"encoding": "raw", "value": "84aae47d-d376-4a35-bde5-c0ee5a808bd3"},
        },
        api_version="3.0",
        regulation="gdpr",
    )
    assert post(stack, erasure).json()["type"] == "dsr_processing_response"
    [erased] = wait_for(lambda: partner.state()["erased"], 30, what="the erasure")

    assert set(erased["erased_events"]) == jane_ids
    left = set(partner.state()["events_by_api_key"][sha(api_key)])
    assert jane_ids.isdisjoint(left) and john_ids <= left
    assert erased["request_id"] == erasure["subject_request_id"]
    assert erased["submitted_time_ms"] == 1_714_592_744_067
