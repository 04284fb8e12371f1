"""The project's own sample messages (tests/fixtures/messages, written by devtools/make_fixtures.py):
up to date with their generator, synthetic, covering every message type and protocol era, and, when
the SDK's shared corpus is on this machine, shaped like it and valid against its JSON Schemas."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest

from devtools import make_fixtures
from devtools.samples import fixture_files, message_files, sdk_schema_validators
from schemas.events import EVENT_TYPES
from tests.support import SAMPLES, extra_corpus

CORPUS = extra_corpus()
DOCUMENTATION_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def load(version: str, name: str) -> Any:
    return json.loads((SAMPLES / version / name).read_bytes())


def parsed_fixtures() -> dict[Path, Any]:
    found = {}
    for path in fixture_files():
        try:
            found[path] = json.loads(path.read_bytes())
        except ValueError:
            continue  # the 1.x registration response, on purpose (see below)
    return found


def leaves(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [leaf for value in node.values() for leaf in leaves(value)]
    if isinstance(node, list):
        return [leaf for value in node for leaf in leaves(value)]
    return [node]


def walk(node: Any) -> list[dict[str, Any]]:
    """Every object in a document, the document itself included."""
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found.extend(walk(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(walk(value))
    return found


def test_fixtures_are_what_the_generator_writes() -> None:
    assert make_fixtures.differences(SAMPLES) == [], "run: .venv/bin/python -m devtools.make_fixtures"


def test_every_version_folder_has_every_message_type_of_its_era() -> None:
    for version in make_fixtures.VERSIONS:
        names = {path.name for path in (SAMPLES / version).glob("*.json")}
        expected = {
            "ModuleRegistrationRequest.json",
            "ModuleRegistrationResponse.json",
            "EventProcessingResponse.json",
            "AudienceSubscriptionRequest.json",
            "AudienceSubscriptionResponse.json",
            "AudienceMembershipChangeRequest.json",
            "AudienceMembershipChangeResponse.json",
        }
        if make_fixtures.since(version, "2.1.1"):
            expected |= {"EventProcessingRequest_ios.json", "EventProcessingRequest_android.json"}
        else:
            expected.add("EventProcessingRequest.json")
        if make_fixtures.since(version, "2.8.1"):
            expected |= {"DsrProcessingRequest.json", "DsrProcessingResponse.json"}
        assert names == expected, version
    assert [p.name for p in (SAMPLES / "observed").iterdir()] == [make_fixtures.OBSERVED_FILE]


@pytest.mark.skipif(CORPUS is None, reason="the shared sample corpus is not on this machine")
def test_same_folders_and_file_names_as_the_shared_corpus() -> None:
    assert CORPUS is not None
    shared = {str(path.relative_to(CORPUS)) for path in message_files(CORPUS)}
    ours = {str(path.relative_to(SAMPLES)) for path in fixture_files()}
    assert ours == shared


@pytest.mark.skipif(CORPUS is None, reason="the shared sample corpus is not on this machine")
def test_no_id_or_value_is_copied_from_the_shared_corpus() -> None:
    assert CORPUS is not None
    shared_text = "\n".join(path.read_text(errors="replace") for path in message_files(CORPUS))
    theirs = set(UUID_RE.findall(shared_text)) | set(re.findall(r"\b[0-9a-f]{32}\b", shared_text))
    ours_text = "\n".join(path.read_text() for path in fixture_files())
    ours = set(UUID_RE.findall(ours_text)) | set(re.findall(r"\b[0-9a-f]{32}\b", ours_text))
    assert not ours & theirs


def test_no_real_looking_personal_data() -> None:
    for path, document in parsed_fixtures().items():
        for leaf in leaves(document):
            if not isinstance(leaf, str):
                continue
            for email in re.findall(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", leaf):
                assert email.endswith(("@example.com", "@example.org", "@example.net")), (path, email)
            for address in re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", leaf):
                assert any(ipaddress.ip_address(address) in net for net in DOCUMENTATION_NETS), (path, address)
            # Phone numbers only from the fictional 555-01xx block.
            for phone in re.findall(r"\+?1?[-\s]?\(?\d{3}\)?[-\s]\d{3}[-\s]\d{4}", leaf):
                assert re.search(r"555-01\d\d$", phone), (path, phone)
            assert not re.fullmatch(r"\+?\d{10,15}", leaf), (path, leaf)  # no bare phone-like numbers


def test_what_the_tests_rely_on_is_there() -> None:
    documents = parsed_fixtures()
    events = [event for d in documents.values() if d.get("type") == "event_processing_request" for event in d["events"]]
    assert {event["type"] for event in events} == EVENT_TYPES
    # int64 session ids a double cannot hold, negative ones among them.
    sessions = [event["session_id"] for event in events if isinstance(event.get("session_id"), int)]
    assert any(s < -(2**53) for s in sessions) and all(abs(s) < 2**63 for s in sessions)
    # Fields no SDK version has, at the top and inside an event.
    android = load("3.2.0", "EventProcessingRequest_android.json")
    assert "x_fixture_future_field" in android and "x_fixture_future_event_field" in android["events"][0]
    # One registration response is not JSON (a `//` comment, as in the SDK's 1.x sample).
    unparseable = set(fixture_files()) - set(documents)
    assert [p.relative_to(SAMPLES).as_posix() for p in unparseable] == [
        "1.x-unversioned/ModuleRegistrationResponse.json"
    ]


def test_the_eras_differ_as_the_protocol_did() -> None:
    # No firehose_version before 2.0; the 2.0.0 event and subscription files were still unversioned.
    assert "firehose_version" not in load("1.x-unversioned", "ModuleRegistrationRequest.json")
    assert load("2.0.0", "ModuleRegistrationRequest.json")["firehose_version"] == "2.0.0"
    assert "firehose_version" not in load("2.0.0", "AudienceSubscriptionRequest.json")
    # 1.x membership: added/removed lists, no actions; 2.0 on: audiences with actions; mpid from 2.1.0.
    old = load("1.x-unversioned", "AudienceMembershipChangeRequest.json")["user_profiles"]
    assert all("added_audiences" in p and "removed_audiences" in p and "audiences" not in p for p in old)
    assert not [a for p in old for a in p["added_audiences"] + p["removed_audiences"] if "action" in a]
    new = load("2.0.0", "AudienceMembershipChangeRequest.json")["user_profiles"][0]
    assert {a["action"] for a in new["audiences"]} == {"add", "attribute_update", "delete"}
    assert "mpid" not in new and "mpid" in load("2.1.0", "AudienceMembershipChangeRequest.json")["user_profiles"][0]
    # suspend_subscription from 2.1.0; the request-level event_connection_settings only until 2.2.0.
    assert "suspend_subscription" not in load("2.0.0", "AudienceMembershipChangeResponse.json")
    assert load("2.1.0", "AudienceMembershipChangeResponse.json")["suspend_subscription"] is False
    assert "event_connection_settings" in load("2.1.1", "EventProcessingRequest_ios.json")
    assert "event_connection_settings" not in load("2.2.0", "EventProcessingRequest_ios.json")
    # CCPA, ATT, custom_flags and platform fields arrive in their folders.
    assert "ccpa_consent_state" not in load("2.3.0", "EventProcessingRequest_ios.json")["consent_state"]
    assert "ccpa_consent_state" in load("2.4.0", "EventProcessingRequest_ios.json")["consent_state"]
    assert "att_authorization_status" in load("2.5.0", "EventProcessingRequest_ios.json")["runtime_environment"]
    assert "custom_flags" not in load("2.9.3", "EventProcessingRequest_ios.json")["events"][0]
    assert "custom_flags" in load("3.0.0", "EventProcessingRequest_ios.json")["events"][0]
    assert "platform_fields" in load("3.2.0", "EventProcessingRequest_ios.json")
    # DSR from the 2.8.1 folder on; the registration declares it from 2.9.3.
    assert not (SAMPLES / "2.8.0" / "DsrProcessingRequest.json").exists()
    assert load("2.8.1", "DsrProcessingRequest.json")["type"] == "dsr_processing_request"
    assert "dsr_processing_registration" in load("2.9.3", "ModuleRegistrationResponse.json")
    # The real-world shape: type first, firehose_version last, nulls and "True" among the settings.
    observed = load("observed", make_fixtures.OBSERVED_FILE)
    keys = list(observed)
    assert (keys[0], keys[-1]) == ("type", "firehose_version")
    assert None in observed["account"]["account_settings"].values()
    assert int(observed["mpid"]) < -(2**53)


# What the SDK's own samples also break in its schemas, kept on purpose: the generator's spurious
# `{}` user attribute (§14.10) and a DSR request without `account` (§10.1).
KNOWN_SCHEMA_DEVIATIONS = {
    "AudienceMembershipChangeRequest.json": [
        "['user_profiles', 0, 'audiences', 1, 'user_attributes', 2, 'action']: 'action' is a required property",
        "['user_profiles', 0, 'audiences', 1, 'user_attributes', 2, 'key']: 'key' is a required property",
    ],
    "DsrProcessingRequest.json": ["['account']: 'account' is a required property"],
}


@pytest.mark.skipif(
    CORPUS is None or not (CORPUS / "3.2.0" / "schema").is_dir(),
    reason="the SDK's JSON Schemas (shared sample corpus, 3.2.0/schema) are not on this machine",
)
def test_320_fixtures_validate_against_the_sdk_schemas() -> None:
    assert CORPUS is not None
    validators = sdk_schema_validators(CORPUS / "3.2.0" / "schema")
    for path in sorted((SAMPLES / "3.2.0").glob("*.json")):
        message_class = path.stem.split("_")[0]  # EventProcessingRequest_ios -> EventProcessingRequest
        document = json.loads(path.read_bytes())
        errors = sorted(f"{list(e.path)}: {e.message}" for e in validators[message_class].iter_errors(document))
        assert errors == KNOWN_SCHEMA_DEVIATIONS.get(path.name, []), path.name
        # Every event of the batch against its own type's schema too (the batch schema only knows Event).
        for event in document.get("events", []):
            schema = {"custom_event": "CustomEvent", "product_action": "ProductActionEvent"}[event["type"]]
            assert [e.message for e in validators[schema].iter_errors(event)] == [], (path.name, event["type"])
    # And the validator does find problems: an unknown identity type is one.
    broken = load("3.2.0", "EventProcessingRequest_ios.json")
    broken["user_identities"][0]["type"] = "palm_print"
    assert list(validators["EventProcessingRequest"].iter_errors(broken))
