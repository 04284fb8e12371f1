"""In-memory partner state: what a real partner would have stored, plus a request log.

Everything here is guarded by one lock. The stub is a test double, so a single
coarse lock is simpler to reason about than fine-grained ones, and it makes
"check the Idempotency-Key, then apply" atomic, which is exactly the property
the relay's tests rely on.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.partner_stub.fault_rules import FaultRule

MEMBER_ACTIONS = frozenset({"add", "delete", "update_attributes"})
IDENTITY_LISTS = ("user_identities", "device_identities", "partner_identities")


class PayloadError(ValueError):
    """The body is JSON but does not follow the contract (answered 400)."""


@dataclass(frozen=True)
class StoredResponse:
    status: int
    payload: dict[str, Any]
    fingerprint: str


# ---------------------------------------------------------------------------
# Validation. Everything is validated before anything is applied so that a 400
# never leaves a half-applied request behind.
#
# The contract's shapes are the JSON Schemas in schemas/ (linked from docs/partner-api.md): every
# request body is checked against its route's schema first, so every test and benchmark that runs
# the stub checks the relay's payloads against the contract. The hand-written checks below keep
# only the rule the schemas leave to the stub (a member change must name someone: it is checked
# where the member's key is made from it) and the few structural guards the bookkeeping relies
# on, for a stub running without jsonschema (see load_validators).
# ---------------------------------------------------------------------------

SCHEMA_DIR = Path(__file__).with_name("schemas")

# Route → its body's schema file. PUT and DELETE of an audience carry the same body.
ROUTE_SCHEMAS: dict[str, str] = {
    "events": "events.schema.json",
    "audience": "audience.schema.json",
    "audience_members": "audience-members.schema.json",
    "erasure": "erasure.schema.json",
}

logger = logging.getLogger("partner_stub")


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _describe(error: Any) -> str:
    """What is wrong, in words taken from the schema and never from the body.

    jsonschema's own messages quote the offending value, and an error body ends up in the relay's
    dead-letter records (docs/partner-api.md, "Status codes"): customers' data must not. `required`
    and `additionalProperties` name keys only, at levels whose keys the relay chooses.
    """
    kind, wanted = error.validator, error.validator_value
    if kind in ("required", "additionalProperties"):
        return str(error.message)
    if kind == "type":
        types = wanted if isinstance(wanted, list) else [wanted]
        return "must be of type " + " or ".join(types)
    if kind == "enum":
        return f"must be one of {_json_text(wanted)}"
    if kind == "const":
        return f"must be {_json_text(wanted)}"
    if kind in ("oneOf", "anyOf"):
        return "matches none of the allowed shapes"
    if kind == "not":
        if isinstance(wanted, dict) and list(wanted) == ["required"]:
            return "must not have " + ", ".join(repr(key) for key in wanted["required"])
        return f"must not match {_json_text(wanted)}"
    if kind == "pattern":
        return f"must match {_json_text(wanted)}"
    return f"fails {kind} {_json_text(wanted)}"


def schema_error_message(error: Any) -> str:
    """`<where in the body>: <what is wrong>`."""
    path = error.json_path
    where = "body" if path == "$" else path.removeprefix("$.")
    return f"{where}: {_describe(error)}"


@dataclass(frozen=True)
class RouteValidator:
    """One route's schema, compiled twice: `full` (jsonschema) says what is wrong, `fast`
    (jsonschema_rs, when installed) only whether anything is, some 200 times sooner.

    The stub answers the benchmarks' traffic: at about 3 ms per batch, jsonschema alone would make
    the stub the slowest part of a run, and every valid body would pay for error reporting it does
    not need. tests/unit/test_partner_contract.py checks that the two agree.
    """

    full: Any
    fast: Any | None

    def errors(self, body: Any) -> list[Any]:
        if self.fast is not None:
            try:
                if self.fast.is_valid(body):
                    return []
            except Exception:  # noqa: BLE001 - e.g. a value it cannot convert: let jsonschema judge
                pass
        # jsonschema is the reference: a body only `fast` refused is still accepted.
        return list(self.full.iter_errors(body))


@functools.cache
def load_validators() -> dict[str, RouteValidator] | None:
    """Route → its RouteValidator (draft 2020-12); None without jsonschema.

    jsonschema comes with requirements-dev.txt, which the test suites and benchmarks run on
    (jsonschema_rs with it, through schemathesis). The runtime image (requirements.txt) has
    neither, and the local docker-compose stack runs the stub there: it then runs unchecked,
    with the structural guards only, and says so once.
    """
    try:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
    except ImportError:
        logger.warning("jsonschema is not installed: request bodies are NOT checked against the contract schemas")
        return None
    try:
        import jsonschema_rs
    except ImportError:
        jsonschema_rs = None
    documents = [json.loads(path.read_text()) for path in sorted(SCHEMA_DIR.glob("*.schema.json"))]
    registry: Registry = Registry().with_resources(
        (document["$id"], Resource.from_contents(document)) for document in documents
    )
    fast_registry = jsonschema_rs.Registry([(d["$id"], d) for d in documents]) if jsonschema_rs else None
    by_file = {document["$id"].rsplit("/", 1)[-1]: document for document in documents}
    return {
        route: RouteValidator(
            full=Draft202012Validator(by_file[file_name], registry=registry),
            fast=(
                jsonschema_rs.validator_for(by_file[file_name], registry=fast_registry)
                if jsonschema_rs and fast_registry
                else None
            ),
        )
        for route, file_name in ROUTE_SCHEMAS.items()
    }


# Enough problems to fix a payload in one go, few enough for a dead-letter record's excerpt.
MAX_SCHEMA_ERRORS = 3


def check_schema(route: str, body: Any) -> None:
    """Raise PayloadError naming how `body` breaks its route's schema (the likeliest causes first)."""
    validators = load_validators()
    if validators is None:
        return
    errors = validators[route].errors(body)
    if errors:
        from jsonschema.exceptions import relevance  # present: load_validators imported jsonschema

        errors.sort(key=relevance, reverse=True)
        shown = "; ".join(schema_error_message(error) for error in errors[:MAX_SCHEMA_ERRORS])
        more = f" (and {len(errors) - MAX_SCHEMA_ERRORS} more)" if len(errors) > MAX_SCHEMA_ERRORS else ""
        raise PayloadError(f"{ROUTE_SCHEMAS[route]}: {shown}{more}")


def _require_object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise PayloadError(f"{what} must be a JSON object")
    return body


def _require_list(obj: dict[str, Any], key: str, what: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise PayloadError(f"{what}: '{key}' must be a list")
    return value


def validate_events(body: Any) -> list[dict[str, Any]]:
    check_schema("events", body)
    # The schema said all of this already; without jsonschema these guards keep apply_events whole.
    batches = _require_list(_require_object(body, "body"), "batches", "body")
    for b_index, batch in enumerate(batches):
        events = _require_list(_require_object(batch, f"batches[{b_index}]"), "events", f"batches[{b_index}]")
        if not isinstance(batch.get("system_notifications") or [], list):
            raise PayloadError(f"batches[{b_index}]: 'system_notifications' must be a list")
        for e_index, event in enumerate(events):
            if not isinstance(_require_object(event, f"batches[{b_index}].events[{e_index}]").get("id"), str):
                raise PayloadError(f"batches[{b_index}].events[{e_index}]: 'id' must be a string")
    return batches


def user_key(user: Any) -> str:
    """Key a user by mpid, else by the first identity of the first non-empty list."""
    if not isinstance(user, dict):
        raise PayloadError("'user' must be a JSON object")
    mpid = user.get("mpid")
    if mpid is not None and mpid != "":
        if isinstance(mpid, bool) or not isinstance(mpid, (str, int)):
            raise PayloadError("'user.mpid' must be a string, an integer or null")
        return str(mpid)
    for list_name in IDENTITY_LISTS:
        identities = user.get(list_name) or []
        if not isinstance(identities, list):
            raise PayloadError(f"'user.{list_name}' must be a list")
        if identities:
            first = identities[0]
            if not isinstance(first, dict) or first.get("type") is None or first.get("value") is None:
                raise PayloadError(f"'user.{list_name}[0]' must have 'type' and 'value'")
            return f"{first['type']}:{first['value']}"
    raise PayloadError("'user' has neither an mpid nor any identity")


def user_identity_keys(user: Any) -> frozenset[tuple[str, str, str]]:
    """A user's identities as (type, encoding, value), its mpid as ("mpid", "raw", mpid).

    Lenient: a batch's user may name nobody (and without jsonschema is not checked at all); a
    malformed one just matches nothing.
    """
    if not isinstance(user, dict):
        return frozenset()
    keys: set[tuple[str, str, str]] = set()
    mpid = user.get("mpid")
    if isinstance(mpid, (str, int)) and not isinstance(mpid, bool) and mpid != "":
        keys.add(("mpid", "raw", str(mpid)))
    for list_name in IDENTITY_LISTS:
        identities = user.get(list_name)
        for identity in identities if isinstance(identities, list) else []:
            if isinstance(identity, dict):
                kind, encoding, value = identity.get("type"), identity.get("encoding"), identity.get("value")
                if isinstance(kind, str) and isinstance(encoding, str) and isinstance(value, str):
                    keys.add((kind, encoding, value))
    return frozenset(keys)


def validate_member_changes(body: Any) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Return (action, user key, attribute actions) per change, in list order."""
    check_schema("audience_members", body)
    changes = _require_list(_require_object(body, "body"), "changes", "body")
    if body.get("audience") is not None:
        _require_object(body["audience"], "'audience'")
    parsed = []
    for index, change in enumerate(changes):
        where = f"changes[{index}]"
        change = _require_object(change, where)
        action = change.get("action")
        if action not in MEMBER_ACTIONS:
            raise PayloadError(f"{where}: 'action' must be one of {sorted(MEMBER_ACTIONS)}")
        # Not in the schema: the user must name someone (mpid or an identity), or the change has
        # no member to apply to; user_key finds out while making the member's key.
        try:
            key = user_key(change.get("user"))
        except PayloadError as exc:
            raise PayloadError(f"{where}: {exc}") from None
        attributes = change.get("attributes") or []
        if not isinstance(attributes, list) or not all(isinstance(a, dict) and "key" in a for a in attributes):
            raise PayloadError(f"{where}: 'attributes' must be a list of objects with a 'key'")
        parsed.append((action, key, attributes))
    return parsed


def validate_erasure(body: Any) -> dict[str, Any]:
    check_schema("erasure", body)
    identities = _require_list(_require_object(body, "body"), "identities", "body")
    for index, identity in enumerate(identities):
        _require_object(identity, f"identities[{index}]")
    return body


def validate_audience(body: Any) -> dict[str, Any]:
    check_schema("audience", body)
    return _require_object(body, "body")


def validate_audience_delete(body: Any) -> dict[str, Any]:
    """A DELETE's body is optional (no Content-Type required): none is no body; one is checked."""
    if body is None:
        return {}
    check_schema("audience", body)
    return _require_object(body, "body")


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


class StubState:
    def __init__(self, max_requests: int = 20_000) -> None:
        self.lock = threading.Lock()
        self.max_requests = max_requests
        self.clear()

    def clear(self) -> None:
        """Forget requests, partner state and fault rules. Caller holds the lock (or is __init__)."""
        # A bounded log so a long benchmark run cannot eat the machine's memory;
        # seq keeps counting so readers can tell that entries were dropped.
        self.requests: deque[dict[str, Any]] = deque(maxlen=self.max_requests)
        self._seq = 0
        self.rules = []
        self.events: dict[str, int] = {}
        self.events_by_key: dict[str, dict[str, int]] = {}
        self.event_batches = 0
        self.duplicates = 0
        self.idempotency_conflicts = 0
        self.audiences: dict[str, dict[str, Any]] = {}
        self.members: dict[str, dict[str, dict[str, Any]]] = {}
        self.erased: list[dict[str, Any]] = []
        # API key hash → event id → the identities of the user the event came with, so an
        # erasure can find that user's events (erase()).
        self.event_users: dict[str, dict[str, frozenset[tuple[str, str, str]]]] = {}
        # "<api_key_sha256>:<user key>" -> the newest consent_state seen for that user, and
        # -> every system notification received for them, in arrival order.
        self.consent: dict[str, dict[str, Any]] = {}
        self.notifications: dict[str, list[dict[str, Any]]] = {}
        self.eventless_batches = 0
        self.idempotency: dict[tuple[str, str, str, str], StoredResponse] = {}

    # --- request log -------------------------------------------------------

    def record(
        self,
        method: str,
        path: str,
        idempotency_key: str | None,
        api_key_sha256: str | None,
        body: Any,
    ) -> dict[str, Any]:
        with self.lock:
            self._seq += 1
            entry = {
                "seq": self._seq,
                "method": method,
                "path": path,
                "status": None,  # filled in once answered
                "idempotency_key": idempotency_key,
                "api_key_sha256": api_key_sha256,
                "body": body,
                "received_at": time.time(),
                "answered_at": None,  # filled in with the status: when the answer left
                "duplicate": False,
                "fault": False,
            }
            self.requests.append(entry)
            return entry

    def list_requests(self, path_prefix: str | None, after_seq: int) -> list[dict[str, Any]]:
        with self.lock:
            return [
                dict(entry)
                for entry in self.requests
                if entry["seq"] > after_seq and (path_prefix is None or entry["path"].startswith(path_prefix))
            ]

    # --- faults --------------------------------------------------------------

    def pick_fault(self, method: str, path: str, api_key_sha256: str | None) -> FaultRule | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path, api_key_sha256) and rule.try_fire():
                    return rule
            return None

    def set_rules(self, rules: list[FaultRule]) -> None:
        with self.lock:
            self.rules = rules

    def rules_view(self) -> list[dict[str, Any]]:
        with self.lock:
            return [rule.to_dict() for rule in self.rules]

    # --- idempotency (caller holds the lock) ---------------------------------

    def seen(self, scope: tuple[str, str, str, str], fingerprint: str) -> StoredResponse | None:
        stored = self.idempotency.get(scope)
        if stored is None:
            return None
        self.duplicates += 1
        if stored.fingerprint != fingerprint:
            # The contract says a key is stable for a given payload; a key reused
            # for a different payload is a relay bug worth surfacing in the state.
            self.idempotency_conflicts += 1
        return stored

    def remember(self, scope: tuple[str, str, str, str], response: StoredResponse) -> None:
        if 200 <= response.status < 300:
            self.idempotency[scope] = response

    # --- application (caller holds the lock) ---------------------------------

    def apply_events(self, key_sha: str, batches: list[dict[str, Any]]) -> int:
        per_key = self.events_by_key.setdefault(key_sha, {})
        owners = self.event_users.setdefault(key_sha, {})
        accepted = 0
        for batch in batches:
            self.event_batches += 1
            if not batch["events"]:
                self.eventless_batches += 1
            self._apply_consent(key_sha, batch)
            owner = user_identity_keys(batch.get("user"))  # one set per batch, shared by its events
            for event in batch["events"]:
                event_id = str(event["id"])
                owners[event_id] = owner
                self.events[event_id] = self.events.get(event_id, 0) + 1
                per_key[event_id] = per_key.get(event_id, 0) + 1
                accepted += 1
        return accepted

    def _apply_consent(self, key_sha: str, batch: dict[str, Any]) -> None:
        ukey = f"{key_sha}:{_batch_user_key(batch.get('user'))}"
        state = batch.get("consent_state")
        timestamp = batch.get("timestamp_ms")
        current = self.consent.get(ukey)
        # Batches can arrive out of order (retries); a partner keeps the newest snapshot, and a
        # batch without one says nothing about consent (absent is not withdrawn).
        if state is not None and (current is None or _newer(timestamp, current["timestamp_ms"])):
            self.consent[ukey] = {
                "consent_state": state,
                "timestamp_ms": timestamp,
                "message_id": batch.get("message_id"),
            }
        for notification in batch.get("system_notifications") or []:
            self.notifications.setdefault(ukey, []).append(
                {"message_id": batch.get("message_id"), "notification": notification}
            )

    def put_audience(self, key_sha: str, audience_id: str, body: dict[str, Any]) -> None:
        akey = f"{key_sha}:{audience_id}"
        self.audiences[akey] = {
            "account_id": body.get("account_id"),
            "name": body.get("name"),
            "description": body.get("description"),
            "settings": body.get("settings") or {},
            # What an `update` changed from, as mParticle said (null: it did not say).
            "previous_settings": body.get("previous_settings"),
            "deleted": False,
            "implicit": False,
        }
        self.members.setdefault(akey, {})

    def delete_audience(self, key_sha: str, audience_id: str, body: dict[str, Any] | None = None) -> None:
        body = body or {}
        akey = f"{key_sha}:{audience_id}"
        audience = self.audiences.get(akey)
        if audience is None:
            # Remember the delete even for an audience never seen, so tests can
            # tell "delete arrived" from "delete never sent"; the body says what it was.
            audience = {
                "account_id": body.get("account_id"),
                "name": body.get("name"),
                "description": body.get("description"),
                "settings": body.get("settings") or {},
                "previous_settings": body.get("previous_settings"),
                "implicit": True,
            }
            self.audiences[akey] = audience
        audience["deleted"] = True
        self.members.pop(akey, None)

    def apply_member_changes(
        self,
        key_sha: str,
        audience_id: str,
        account_id: Any,
        changes: list[tuple[str, str, list[dict[str, Any]]]],
        described: dict[str, Any] | None = None,
    ) -> int:
        """Apply member changes in order. `described` is the call's `audience` (name, settings): an
        audience created implicitly takes them; an existing one keeps its own (only PUT changes them)
        and shows the last call's as `member_call_audience`."""
        described = described or {}
        akey = f"{key_sha}:{audience_id}"
        audience = self.audiences.get(akey)
        if audience is None or audience["deleted"]:
            # Membership can outrun the audience's PUT (different queues), so a
            # partner creates the audience on first sight rather than refusing.
            previous = audience or {}
            self.audiences[akey] = audience = {
                "account_id": previous.get("account_id", account_id),
                "name": described.get("name") or previous.get("name"),
                "description": previous.get("description"),
                "settings": described.get("settings") or previous.get("settings", {}),
                "previous_settings": None,
                "deleted": False,
                "implicit": True,
            }
        if described:
            audience["member_call_audience"] = {"name": described.get("name"), "settings": described.get("settings")}
        members = self.members.setdefault(akey, {})
        for action, ukey, attributes in changes:
            if action == "add":
                # A user joins with the attributes the add carries; an add of a member applies
                # them to the attributes it has.
                member = members.setdefault(ukey, {"attributes": {}})
                _apply_attributes(member["attributes"], attributes)
            elif action == "delete":
                members.pop(ukey, None)
            else:  # update_attributes
                member = members.get(ukey)
                # Attributes of a user who is not in the audience have nowhere to
                # live; a partner would drop them rather than make the user a member.
                if member is not None:
                    _apply_attributes(member["attributes"], attributes)
        return len(changes)

    def erase(self, key_sha: str, body: dict[str, Any]) -> None:
        """Delete what the customer sent about the users these identities name: their events,
        audience memberships and consent records.

        Matching is by exact (type, encoding, value), `mpid` included: a partner holds only what
        the events and membership changes gave it, so an erasure in any other naming or encoding
        finds nothing, which is what the relay's tests must be able to see.
        """
        wanted = {
            (i["type"], i["encoding"], i["value"])
            for i in body["identities"]
            if isinstance(i.get("type"), str) and isinstance(i.get("encoding"), str) and isinstance(i.get("value"), str)
        }
        owners = self.event_users.get(key_sha, {})
        per_key = self.events_by_key.get(key_sha, {})
        gone = sorted(event_id for event_id, owner in owners.items() if owner & wanted)
        for event_id in gone:
            del owners[event_id]
            applied = per_key.pop(event_id, 0)
            left = self.events.get(event_id, 0) - applied
            if left > 0:  # the same event id under another API key stays
                self.events[event_id] = left
            else:
                self.events.pop(event_id, None)
        # Members and consent are keyed by mpid, else "type:value" (user_key): no encoding there.
        user_keys = {value if kind == "mpid" else f"{kind}:{value}" for kind, _encoding, value in wanted}
        members_gone = 0
        for akey, members in self.members.items():
            if akey.startswith(f"{key_sha}:"):
                for ukey in user_keys.intersection(members):
                    del members[ukey]
                    members_gone += 1
        for ukey in user_keys:
            self.consent.pop(f"{key_sha}:{ukey}", None)
            self.notifications.pop(f"{key_sha}:{ukey}", None)
        self.erased.append(
            {
                "request_id": body.get("request_id"),
                "identities": body["identities"],
                "regulation": body.get("regulation"),
                "account_id": body.get("account_id"),
                "submitted_time_ms": body.get("submitted_time_ms"),
                "api_key_sha256": key_sha,
                "erased_events": gone,
                "erased_members": members_gone,
            }
        )

    # --- views ---------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        with self.lock:
            return {
                "events": dict(self.events),
                "events_by_api_key": {k: dict(v) for k, v in self.events_by_key.items()},
                "event_batches": self.event_batches,
                "duplicates": self.duplicates,
                "idempotency_conflicts": self.idempotency_conflicts,
                "audiences": {k: dict(v) for k, v in self.audiences.items()},
                "members": {
                    akey: {ukey: {"attributes": dict(m["attributes"])} for ukey, m in members.items()}
                    for akey, members in self.members.items()
                },
                "erased": [dict(e) for e in self.erased],
                "consent": {k: dict(v) for k, v in self.consent.items()},
                "notifications": {k: list(v) for k, v in self.notifications.items()},
                "eventless_batches": self.eventless_batches,
                "requests_seen": self._seq,
            }


def _batch_user_key(user: Any) -> str:
    """An event batch's user as members are keyed; "unknown" when it names nobody (the events
    route accepts such batches, so their consent is still shown rather than dropped)."""
    try:
        return user_key(user)
    except PayloadError:
        return "unknown"


def _newer(timestamp: Any, than: Any) -> bool:
    if not isinstance(timestamp, int) or not isinstance(than, int):
        return True  # nothing to order by: the later arrival wins
    return timestamp >= than


def _apply_attributes(target: dict[str, Any], attributes: list[dict[str, Any]]) -> None:
    for attr in attributes:
        if attr.get("action", "upsert") == "delete":
            target.pop(attr["key"], None)
        elif attr.get("list_value") is not None:
            target[attr["key"]] = list(attr["list_value"])
        else:
            target[attr["key"]] = attr.get("value")
