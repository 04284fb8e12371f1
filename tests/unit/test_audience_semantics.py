"""Audience semantics reach the partner faithfully: a user added and updated in one message joins
with the attributes, attributes on `add` travel, changes in the same millisecond apply in arrival
order, member calls older than a subscription `remove` are dropped, and the per-audience name and
settings (and the previous settings of an update) are in the payloads.

In process: the worker core on the suite's Redis, sending to the partner stub's Flask app through
its test client (the reference client's routes and headers), so what is checked is the partner's
state, as the contract (docs/partner-api.md) says it ends up.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from common.marks import Marks
from devtools.partner_stub import api_key_sha256, create_stub_app
from tests.support.worker_core import MEMBERSHIP_MESSAGE, SUBSCRIPTION_MESSAGE, core_runtime
from workers.audiences import REMOVED_FIELD, SUBSCRIPTION_FIELD, collapse_changes
from workers.delivery import Action, Decision
from workers.mapping import plan_message
from workers.partner.base import Operation, OperationKind, PartnerResult
from workers.partner.reference import ROUTES
from workers.runtime import Runtime
from workers.tasks import run_attempt

T0 = 1_764_000_000_000
SETTINGS = {"partnerAudienceId": "list-9", "listName": "Loyal"}


class StubPartner:
    """The partner stub in process: each operation goes to the route the reference client uses."""

    def __init__(self) -> None:
        self.client: FlaskClient = create_stub_app().test_client()
        self.sent: list[Operation] = []

    def send(self, operation: Operation, idempotency_key: str) -> PartnerResult:
        self.sent.append(operation)
        method, path = ROUTES[operation.kind]
        response = self.client.open(
            path.format(audience_id=operation.audience_id),
            method=method,
            data=orjson.dumps(operation.payload),
            headers={
                "Authorization": f"Bearer {operation.api_key}",
                "Idempotency-Key": idempotency_key,
                "Content-Type": "application/json",
            },
        )
        return PartnerResult(response.status_code, error=None if response.status_code < 300 else response.text)

    def state(self) -> dict[str, Any]:
        return self.client.get("/_stub/state").get_json()

    def audience(self, api_key: str, audience_id: int) -> dict[str, Any] | None:
        return self.state()["audiences"].get(f"{api_key_sha256(api_key)}:{audience_id}")

    def members(self, api_key: str, audience_id: int) -> dict[str, Any] | None:
        return self.state()["members"].get(f"{api_key_sha256(api_key)}:{audience_id}")


@pytest.fixture
def partner() -> StubPartner:
    return StubPartner()


@pytest.fixture
def rt(partner: StubPartner) -> Iterator[Runtime]:
    runtime = core_runtime(partner)  # type: ignore[arg-type]
    yield runtime
    runtime.redis.close()


def _envelope(kind: str, api_key: str, ts: int) -> dict[str, Any]:
    return {
        "type": kind,
        "id": str(uuid.uuid4()),
        "timestamp_ms": ts,
        "firehose_version": "3.2.0",
        "account": {"account_id": 42, "account_settings": {"apiKey": api_key}},
    }


def _audience(audience_id: int, action: str, attributes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "audience_id": audience_id,
        "audience_name": "Loyal",
        "audience_subscription_settings": SETTINGS,
        "action": action,
    }
    if attributes is not None:
        entry["user_attributes"] = attributes
    return entry


def _membership(api_key: str, ts: int, profiles: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    message = _envelope(MEMBERSHIP_MESSAGE, api_key, ts)
    message["user_profiles"] = [{"mpid": mpid, "audiences": audiences} for mpid, audiences in profiles]
    return message


def _subscription(api_key: str, ts: int, action: str, audience_id: int = 5, **fields: Any) -> dict[str, Any]:
    message = _envelope(SUBSCRIPTION_MESSAGE, api_key, ts)
    message.update(audience_id=audience_id, audience_name="Loyal", action=action, **fields)
    return message


def _attr(key: str, value: str | None = None, action: str = "upsert") -> dict[str, Any]:
    return {"key": key, "value": value, "action": action}


def _run(rt: Runtime, message: dict[str, Any]) -> Decision | None:
    return run_attempt([orjson.dumps(message).decode()], 1, None, grouped=False, rt=rt)


DELIVERED = Decision(Action.DELIVERED, 1)


# ---------------------------------------------------------------- add and attributes


def test_a_user_added_and_updated_in_one_message_joins_with_the_attributes(rt: Runtime, partner: StubPartner) -> None:
    message = _membership(
        "k-merge",
        T0,
        [
            (
                "u1",
                [
                    _audience(5, "add", [_attr("tier", "silver")]),
                    _audience(5, "attribute_update", [_attr("tier", "gold"), _attr("city", "Oslo")]),
                ],
            )
        ],
    )
    assert _run(rt, message) == DELIVERED
    [sent] = partner.sent
    [change] = sent.payload["changes"]
    assert change["action"] == "add"
    assert [a["key"] for a in change["attributes"]] == ["tier", "tier", "city"]
    assert partner.members("k-merge", 5) == {"u1": {"attributes": {"tier": "gold", "city": "Oslo"}}}


def test_attributes_on_add_are_forwarded_and_stored(rt: Runtime, partner: StubPartner) -> None:
    message = _membership(
        "k-add", T0, [("u1", [_audience(5, "add", [_attr("tier", "gold")])]), ("u2", [_audience(5, "add")])]
    )
    [op] = plan_message(message).operations
    # An add without attributes keeps the payload (and the idempotency key) it always had.
    assert [c.get("attributes") for c in op.payload["changes"]] == [
        [_attr("tier", "gold") | {"list_value": None}],
        None,
    ]
    assert _run(rt, message) == DELIVERED
    assert partner.members("k-add", 5) == {"u1": {"attributes": {"tier": "gold"}}, "u2": {"attributes": {}}}


def test_collapsing_one_messages_changes_per_user() -> None:
    def change(action: str, *keys: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"action": action, "timestamp_ms": T0, "user": {"mpid": "u"}}
        if keys:
            entry["attributes"] = [_attr(key, "v") for key in keys]
        return entry

    def collapsed(*changes: dict[str, Any]) -> tuple[str, list[str]]:
        [only] = collapse_changes(list(changes)).values()
        return only["action"], [a["key"] for a in only.get("attributes") or []]

    assert collapsed(change("add", "a"), change("update_attributes", "b")) == ("add", ["a", "b"])
    assert collapsed(change("update_attributes", "a"), change("add")) == ("add", ["a"])
    assert collapsed(change("update_attributes", "a"), change("update_attributes", "b")) == (
        "update_attributes",
        ["a", "b"],
    )
    # The last add or delete decides membership; attribute updates of a non-member are moot.
    assert collapsed(change("add", "a"), change("delete")) == ("delete", [])
    assert collapsed(change("delete"), change("update_attributes", "a")) == ("delete", [])
    assert collapsed(change("delete"), change("add", "b")) == ("add", ["b"])
    single = change("add", "a")
    assert collapse_changes([single]) == {"mpid:u": single}
    assert next(iter(collapse_changes([single]).values())) is single  # unmerged: the same object


# ---------------------------------------------------------------- the same millisecond


def test_changes_in_the_same_millisecond_apply_in_arrival_order(rt: Runtime, partner: StubPartner) -> None:
    assert _run(rt, _membership("k-ms", T0, [("u1", [_audience(5, "add")])])) == DELIVERED
    assert _run(rt, _membership("k-ms", T0, [("u1", [_audience(5, "delete")])])) == DELIVERED
    assert partner.members("k-ms", 5) == {}
    # And back: the last to arrive wins, whichever it is.
    assert _run(rt, _membership("k-ms", T0, [("u1", [_audience(5, "add")])])) == DELIVERED
    assert partner.members("k-ms", 5) == {"u1": {"attributes": {}}}
    # Strictly older is still dropped, without a call.
    calls = len(partner.sent)
    assert _run(rt, _membership("k-ms", T0 - 1, [("u1", [_audience(5, "delete")])])) == DELIVERED
    assert len(partner.sent) == calls and partner.members("k-ms", 5) == {"u1": {"attributes": {}}}


# ---------------------------------------------------------------- removal orders member calls


def test_member_calls_older_than_a_remove_are_dropped(rt: Runtime, partner: StubPartner) -> None:
    key = "k-rm"
    assert _run(rt, _subscription(key, T0, "add")) == DELIVERED
    assert _run(rt, _membership(key, T0 + 10, [("u1", [_audience(5, "add")])])) == DELIVERED
    assert _run(rt, _subscription(key, T0 + 30, "remove")) == DELIVERED
    assert partner.audience(key, 5)["deleted"] is True  # type: ignore[index]

    # A late retried member call from before the remove: not sent, the audience stays deleted.
    calls = len(partner.sent)
    assert _run(rt, _membership(key, T0 + 20, [("u2", [_audience(5, "add")])])) == DELIVERED
    assert _run(rt, _subscription(key, T0 + 25, "update")) == DELIVERED
    assert len(partner.sent) == calls
    assert partner.audience(key, 5)["deleted"] is True  # type: ignore[index]
    assert partner.members(key, 5) is None

    # Newer than the remove: the customer connected it again, members follow and are kept.
    assert _run(rt, _subscription(key, T0 + 40, "add")) == DELIVERED
    assert _run(rt, _membership(key, T0 + 50, [("u3", [_audience(5, "add")])])) == DELIVERED
    # A member change from before the remove stays dropped even after the new add.
    assert _run(rt, _membership(key, T0 + 20, [("u4", [_audience(5, "add")])])) == DELIVERED
    assert partner.audience(key, 5)["deleted"] is False  # type: ignore[index]
    assert partner.members(key, 5) == {"u3": {"attributes": {}}}
    applied = rt.redis.hgetall(rt.keys.audience_applied(f"{partner.sent[0].partner_key()}:5"))
    assert (applied[SUBSCRIPTION_FIELD.encode()], applied[REMOVED_FIELD.encode()]) == (
        b"%d" % (T0 + 40),
        b"%d" % (T0 + 30),
    )


def test_member_calls_newer_than_a_remove_recreate_the_audience(rt: Runtime, partner: StubPartner) -> None:
    key = "k-re"
    assert _run(rt, _subscription(key, T0, "remove")) == DELIVERED
    # In the same millisecond as the remove, but after it: arrival order, so it is sent.
    assert _run(rt, _membership(key, T0, [("u1", [_audience(5, "add")])])) == DELIVERED
    audience = partner.audience(key, 5)
    assert audience is not None and (audience["deleted"], audience["implicit"]) == (False, True)
    # The implicitly created audience takes the name and settings the member call carries.
    assert (audience["name"], audience["settings"]) == ("Loyal", SETTINGS)
    assert partner.members(key, 5) == {"u1": {"attributes": {}}}


# ---------------------------------------------------------------- per-audience fields


def test_membership_payload_carries_the_audiences_name_and_settings() -> None:
    message = _membership("k-f", T0, [("u1", [_audience(5, "add"), _audience(6, "delete")])])
    message["user_profiles"][0]["audiences"][1]["audience_name"] = "Lapsed"
    message["user_profiles"][0]["audiences"][1].pop("audience_subscription_settings")
    five, six = plan_message(message).operations
    assert five.payload["audience"] == {"name": "Loyal", "settings": SETTINGS}
    assert six.payload["audience"] == {"name": "Lapsed", "settings": {}}


def test_subscription_payloads_carry_settings_and_previous_settings(rt: Runtime, partner: StubPartner) -> None:
    key = "k-sub"
    previous = {"partnerAudienceId": "list-8", "listName": "Old"}
    update = _subscription(
        key,
        T0,
        "update",
        audience_subscription_settings=SETTINGS,
        previous_audience_subscription_settings=previous,
    )
    [op] = plan_message(update).operations
    assert (op.payload["settings"], op.payload["previous_settings"]) == (SETTINGS, previous)
    assert _run(rt, update) == DELIVERED
    audience = partner.audience(key, 5)
    assert audience is not None and (audience["settings"], audience["previous_settings"]) == (SETTINGS, previous)
    # Absent is not empty: no previous settings said is null.
    [plain] = plan_message(_subscription(key, T0, "add")).operations
    assert plain.payload["previous_settings"] is None

    # A remove tells the partner which list it was, by its settings; never seen audiences too.
    removal = _subscription(key, T0 + 1, "remove", audience_id=6, audience_subscription_settings=SETTINGS)
    [op] = plan_message(removal).operations
    assert (op.kind, op.payload["name"], op.payload["settings"]) == (OperationKind.AUDIENCE_DELETE, "Loyal", SETTINGS)
    assert _run(rt, removal) == DELIVERED
    gone = partner.audience(key, 6)
    assert gone is not None and (gone["deleted"], gone["name"], gone["settings"]) == (True, "Loyal", SETTINGS)


def test_the_stub_refuses_malformed_audience_descriptions(partner: StubPartner) -> None:
    headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    user = {"mpid": "u", "user_identities": [], "device_identities": [], "partner_identities": []}
    change = {"action": "add", "timestamp_ms": 1, "user": user}
    bad = partner.client.post(
        "/v1/audiences/5/members", json={"audience": {"settings": "x"}, "changes": [change]}, headers=headers
    )
    assert bad.status_code == 400
    assert partner.client.put("/v1/audiences/5", json={"previous_settings": []}, headers=headers).status_code == 400
    # DELETE's body stays optional.
    assert partner.client.delete("/v1/audiences/5", headers={"Authorization": "Bearer k"}).status_code == 200
    good = partner.client.post(
        "/v1/audiences/7/members",
        json={"account_id": 1, "audience": {"name": "A", "settings": {}}, "changes": [change]},
        headers=headers,
    )
    assert good.status_code == 200
    state = partner.state()["audiences"][f"{api_key_sha256('k')}:7"]
    assert state["member_call_audience"] == {"name": "A", "settings": {}}


def test_a_remove_older_than_acknowledged_member_changes_is_not_sent(rt: Runtime, partner: StubPartner) -> None:
    """The remove arrives (or is retried by mParticle) after member changes newer than it were
    acknowledged: sent, it would delete the members the audience has had since."""
    key = "k-late-rm"
    assert _run(rt, _subscription(key, T0, "add")) == DELIVERED
    assert _run(rt, _membership(key, T0 + 50, [("u1", [_audience(5, "add")])])) == DELIVERED
    calls = len(partner.sent)
    assert _run(rt, _subscription(key, T0 + 30, "remove")) == DELIVERED
    assert len(partner.sent) == calls
    assert partner.audience(key, 5)["deleted"] is False  # type: ignore[index]
    assert partner.members(key, 5) == {"u1": {"attributes": {}}}
    # A remove newer than every member change is sent, and then member calls from before it stay out.
    assert _run(rt, _subscription(key, T0 + 60, "remove")) == DELIVERED
    assert _run(rt, _membership(key, T0 + 55, [("u2", [_audience(5, "add")])])) == DELIVERED
    assert partner.audience(key, 5)["deleted"] is True  # type: ignore[index]
    assert partner.members(key, 5) is None


def test_a_repeated_remove_does_not_delete_what_came_after_it(rt: Runtime, partner: StubPartner) -> None:
    """The same remove message run again once it was applied (a retry that raced past its
    delivered mark, a replay) is dropped: member changes after it recreated the audience."""
    key = "k-rep-rm"
    removal = _subscription(key, T0, "remove")
    assert _run(rt, removal) == DELIVERED
    assert _run(rt, _membership(key, T0, [("u1", [_audience(5, "add")])])) == DELIVERED
    [op] = plan_message(removal).operations
    assert Marks(rt.redis, rt.keys, rt.settings.dedup_ttl_seconds).forget_delivered([op.idempotency_key()])
    calls = len(partner.sent)
    assert _run(rt, removal) == DELIVERED
    assert len(partner.sent) == calls
    assert partner.members(key, 5) == {"u1": {"attributes": {}}}
    # Another removal in the same millisecond is a new one: arrival order, it deletes the audience.
    assert _run(rt, _subscription(key, T0, "remove")) == DELIVERED
    assert len(partner.sent) == calls + 1
    assert partner.audience(key, 5)["deleted"] is True  # type: ignore[index]
    assert partner.members(key, 5) is None
