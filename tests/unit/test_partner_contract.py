"""The partner contract as JSON Schemas (devtools/partner_stub/schemas/): docs/partner-api.md's
request examples and the bodies the relay builds from every fixture message must match them, so
the document, the schemas and the code cannot drift apart unnoticed. (The stub refusing what does
not match: tests/unit/test_partner_stub.py.)
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from devtools.partner_stub.state import ROUTE_SCHEMAS, SCHEMA_DIR, RouteValidator, load_validators
from tests.support import ROOT, SAMPLES
from workers.delivery import Member, calls_for
from workers.mapping import plan_message
from workers.partner.base import Operation, OperationKind
from workers.partner.reference import ROUTES

DOC = ROOT / "docs" / "partner-api.md"

# The reference client's route (method, path template) → the stub's schema route.
SCHEMA_OF_ROUTE: dict[tuple[str, str], str] = {
    ("POST", "/v1/events"): "events",
    ("PUT", "/v1/audiences/{audience_id}"): "audience",
    ("DELETE", "/v1/audiences/{audience_id}"): "audience",
    ("POST", "/v1/audiences/{audience_id}/members"): "audience_members",
    ("DELETE", "/v1/users"): "erasure",
}

# A request example in the doc: a marker naming its schema file, then a fenced json block.
EXAMPLE_RE = re.compile(r"<!-- request-example: ([\w-]+) -->\n```json\n(.*?)\n```", re.S)
# The request sections: "## 1. Events: ..." to "## 4. Erasure: ...", each up to the next "## ".
REQUEST_SECTION_RE = re.compile(r"^## \d\. .*?(?=^## )", re.S | re.M)

FIREHOSE_REQUESTS = frozenset(
    {
        "event_processing_request",
        "audience_subscription_request",
        "audience_membership_change_request",
        "dsr_processing_request",
    }
)


def validators() -> dict[str, RouteValidator]:
    loaded = load_validators()
    assert loaded is not None, "jsonschema is a dev dependency: the contract tests need it"
    return loaded


def problems(route: str, body: Any) -> list[str]:
    """jsonschema's verdict (the reference), its messages for reading a failure."""
    return [f"{e.json_path}: {e.message}" for e in validators()[route].full.iter_errors(body)]


def route_of_file(name: str) -> str:
    return next(route for route, file_name in ROUTE_SCHEMAS.items() if file_name == f"{name}.schema.json")


# --------------------------------------------------------------------------- the schemas


def test_every_schema_is_draft_2020_12_and_linked_from_the_doc() -> None:
    doc = DOC.read_text()
    files = sorted(path.name for path in SCHEMA_DIR.glob("*.schema.json"))
    assert set(ROUTE_SCHEMAS.values()) | {"common.schema.json"} == set(files)
    for name in files:
        schema = json.loads((SCHEMA_DIR / name).read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        Draft202012Validator.check_schema(schema)
        assert schema["$id"].endswith(f"/{name}"), name  # relative $refs resolve to the sibling files
        assert f"(../devtools/partner_stub/schemas/{name})" in doc, f"docs/partner-api.md does not link {name}"
    # Every route the reference client calls has its schema.
    assert set(ROUTES.values()) == set(SCHEMA_OF_ROUTE)


# --------------------------------------------------------------------------- the document's examples


def doc_examples() -> list[tuple[str, str]]:
    return [(match.group(1), match.group(2)) for match in EXAMPLE_RE.finditer(DOC.read_text())]


def test_every_request_section_has_marked_examples_only() -> None:
    doc = DOC.read_text()
    sections = REQUEST_SECTION_RE.findall(doc)
    assert [section.split("\n", 1)[0][:5] for section in sections] == ["## 1.", "## 2.", "## 3.", "## 4."]
    for section in sections:
        blocks = section.count("```json")
        marked = len(EXAMPLE_RE.findall(section))
        # An unmarked json block in a request section would escape the check below.
        assert blocks == marked >= 1, section.split("\n", 1)[0]
    assert {route_of_file(name) for name, _ in doc_examples()} == set(ROUTE_SCHEMAS)


@pytest.mark.parametrize(("name", "text"), doc_examples(), ids=[name for name, _ in doc_examples()])
def test_the_doc_examples_match_their_schema(name: str, text: str) -> None:
    assert problems(route_of_file(name), json.loads(text)) == []


# --------------------------------------------------------------------------- what the relay sends


def fixture_messages() -> list[tuple[str, dict[str, Any]]]:
    """Every fixture request message of every version, ready to plan: the fixtures of memberships
    and erasures carry no apiKey (mParticle's samples have none), which planning needs."""
    found = []
    for path in sorted(SAMPLES.glob("*/*.json")):
        try:
            message = json.loads(path.read_bytes())
        except ValueError:
            continue  # the 1.x registration response is not JSON, on purpose
        if not isinstance(message, dict) or message.get("type") not in FIREHOSE_REQUESTS:
            continue
        account = message.get("account")
        if not isinstance(account, dict):
            message["account"] = account = {}
        settings = account.get("account_settings") or {}
        if not settings.get("apiKey"):
            account["account_settings"] = {**settings, "apiKey": f"fixture-api-key-{path.parent.name}"}
        found.append((f"{path.parent.name}/{path.name}", message))
    return found


FIXTURES = fixture_messages()


def sent_body(operation: Operation) -> Any:
    """The body as the reference client puts it on the wire (orjson.dumps), read back."""
    return orjson.loads(orjson.dumps(operation.payload))


def schema_route(operation: Operation) -> str:
    return SCHEMA_OF_ROUTE[ROUTES[operation.kind]]


def test_the_fixtures_cover_every_version_and_kind() -> None:
    versions = {name.split("/")[0] for name, _ in FIXTURES}
    assert versions == {path.name for path in SAMPLES.iterdir() if path.is_dir()}
    kinds = {op.kind for _, message in FIXTURES for op in plan_message(message).operations}
    # Fixtures only subscribe; the removal's body is checked below from them.
    assert kinds == set(OperationKind) - {OperationKind.AUDIENCE_DELETE}


def relay_operations(message: dict[str, Any]) -> list[Operation]:
    operations = plan_message(message).operations
    if message["type"] == "audience_subscription_request":
        # The same audience removed and updated: DELETE carries PUT's body, previous settings too.
        for action, extra in (("remove", {}), ("update", {"previous_audience_subscription_settings": {"a": "b"}})):
            operations += plan_message(copy.deepcopy(message) | {"action": action} | extra).operations
    return operations


@functools.cache
def relay_bodies(name: str) -> tuple[tuple[str, OperationKind, Any], ...]:
    """(schema route, kind, body on the wire) of each call the relay makes for one fixture message."""
    message = dict(FIXTURES)[name]
    return tuple((schema_route(op), op.kind, sent_body(op)) for op in relay_operations(message))


@pytest.mark.parametrize("name", [name for name, _ in FIXTURES])
def test_what_the_relay_sends_for_every_fixture_matches_the_schemas(name: str) -> None:
    bodies = relay_bodies(name)
    assert bodies, name
    for route, kind, body in bodies:
        assert problems(route, body) == [], (name, kind)


def test_a_group_of_event_batches_in_one_call_matches_the_schema() -> None:
    """workers/delivery.py merges the batches of one API key into one POST /v1/events."""
    events = [message for _, message in FIXTURES if message["type"] == "event_processing_request"]
    members = []
    for message in events:
        message = copy.deepcopy(message)
        message["account"]["account_settings"]["apiKey"] = "one-customer"
        plan = plan_message(message)
        marks = tuple(op.idempotency_key() for op in plan.operations)
        members.append(Member("", plan.message_id, plan.account_id, plan.message_type, tuple(plan.operations), marks))
    [call] = calls_for(members)
    body = sent_body(call.operation)
    assert len(body["batches"]) == len(events) > 1
    assert problems("events", body) == []


# --------------------------------------------------------------------------- the schemas are strict


def first_fixture(kind: OperationKind) -> dict[str, Any]:
    """The body of `kind` from the newest protocol's fixtures: they have every field filled in."""
    for name, message in FIXTURES:
        if not name.startswith("3.2.0/"):
            continue
        for operation in plan_message(message).operations:
            if operation.kind is kind:
                return sent_body(operation)
    raise AssertionError(kind)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = body
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = body
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return change


# What the review found the doc showing where the wire has something else, and the like: each is refused.
REFUSED: list[tuple[str, OperationKind, Callable[[dict[str, Any]], None]]] = [
    ("numeric event id", OperationKind.EVENTS, _set("batches.0.events.0.id", 6004519428367785729)),
    ("event type not of the 16", OperationKind.EVENTS, _set("batches.0.events.0.type", "commerce_event")),
    ("custom_event without name", OperationKind.EVENTS, _drop("batches.0.events.0.name")),
    ("device with identities", OperationKind.EVENTS, _set("batches.0.device.identities", [])),
    ("batch key not in the contract", OperationKind.EVENTS, _set("batches.0.device_platform", "iOS")),
    ("batch key missing", OperationKind.EVENTS, _drop("batches.0.platform_fields")),
    ("numeric mpid", OperationKind.EVENTS, _set("batches.0.user.mpid", 5)),
    ("identity with an extra key", OperationKind.EVENTS, _set("batches.0.user.user_identities.0.extra", "x")),
    ("empty batch list", OperationKind.EVENTS, _set("batches", [])),
    ("consent_state not an object", OperationKind.EVENTS, _set("batches.0.consent_state", ["yes"])),
    ("unknown notification type", OperationKind.EVENTS, _set("batches.0.system_notifications.0.type", "x")),
    ("batch with neither events nor notifications", OperationKind.EVENTS, _set("batches.0.events", [])),
    ("audience settings not strings", OperationKind.AUDIENCE_UPSERT, _set("settings", {"a": 1})),
    ("audience without previous_settings", OperationKind.AUDIENCE_UPSERT, _drop("previous_settings")),
    ("unknown member action", OperationKind.MEMBERS, _set("changes.0.action", "attribute_update")),
    ("member call without audience", OperationKind.MEMBERS, _drop("audience")),
    ("no changes", OperationKind.MEMBERS, _set("changes", [])),
    ("erasure identity without encoding", OperationKind.ERASE, _drop("identities.0.encoding")),
    ("erasure without request_id", OperationKind.ERASE, _drop("request_id")),
]


@pytest.mark.parametrize(("what", "kind", "change"), REFUSED, ids=[what for what, _, _ in REFUSED])
def test_the_schemas_refuse_what_the_contract_does_not_allow(
    what: str, kind: OperationKind, change: Callable[[dict[str, Any]], None]
) -> None:
    body = first_fixture(kind)
    route = SCHEMA_OF_ROUTE[ROUTES[kind]]
    if what == "batch with neither events nor notifications":
        body["batches"][0]["system_notifications"] = []
    assert problems(route, body) == []
    change(body)
    assert problems(route, body), what


def test_member_change_rules_by_action() -> None:
    body = first_fixture(OperationKind.MEMBERS)
    change = body["changes"][0]
    change.pop("attributes", None)
    change["action"] = "update_attributes"
    assert problems("audience_members", body)  # attributes always on update_attributes
    change["action"] = "delete"
    assert problems("audience_members", body) == []
    change["attributes"] = []
    assert problems("audience_members", body)  # never on delete


def test_schema_files_are_plain_json_beside_the_stub() -> None:
    # The runtime image copies devtools/ but not docs/ (.dockerignore): the stub loads them from there.
    assert SCHEMA_DIR == ROOT / "devtools" / "partner_stub" / "schemas"
    assert all(isinstance(json.loads(Path(p).read_text()), dict) for p in SCHEMA_DIR.iterdir())


def test_the_stubs_fast_validator_agrees_with_jsonschema() -> None:
    """The stub asks jsonschema_rs first (RouteValidator): it must say yes exactly where jsonschema
    does, on the bodies above, valid and refused."""
    if any(v.fast is None for v in validators().values()):
        pytest.skip("jsonschema_rs is not installed: the stub uses jsonschema alone")
    bodies = [(route_of_file(name), json.loads(text)) for name, text in doc_examples()]
    bodies += [(route, body) for name, _ in FIXTURES for route, _, body in relay_bodies(name)]
    for _, kind, change in REFUSED:
        body = first_fixture(kind)
        change(body)
        bodies.append((SCHEMA_OF_ROUTE[ROUTES[kind]], body))
    verdicts = [(route, not problems(route, body), validators()[route].fast.is_valid(body)) for route, body in bodies]
    assert [v for v in verdicts if v[1] is not v[2]] == []
    assert {valid for _, valid, _ in verdicts} == {True, False}
