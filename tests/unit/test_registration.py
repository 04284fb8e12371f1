"""The registration response validates against the SDK's 3.2.0 JSON Schema (draft 3)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft3Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT3

from service.registration import registration_response
from tests.support import SAMPLES

SCHEMA_DIR = SAMPLES / "3.2.0" / "schema"


def _with_ids(node: Any) -> list[dict[str, Any]]:
    """Every (nested) schema object that carries a urn id, so $refs between files resolve."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("id"), str) and node["id"].startswith("urn:"):
            found.append(node)
        for value in node.values():
            found.extend(_with_ids(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_with_ids(value))
    return found


@pytest.fixture(scope="module")
def validator() -> Draft3Validator:
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"no schemas at {SCHEMA_DIR}")
    registry = Registry()
    for path in sorted(SCHEMA_DIR.glob("*_schema.json")):
        for schema in _with_ids(json.loads(path.read_text())):
            registry = registry.with_resource(schema["id"], Resource(contents=schema, specification=DRAFT3))
    schema = json.loads((SCHEMA_DIR / "ModuleRegistrationResponse_schema.json").read_text())
    return Draft3Validator(schema, registry=registry)


def test_sdk_sample_validates(validator: Draft3Validator) -> None:
    # Proves the validator setup itself: the SDK's own sample has zero errors.
    sample = json.loads((SAMPLES / "3.2.0" / "ModuleRegistrationResponse.json").read_text())
    assert list(validator.iter_errors(sample)) == []


def test_validator_catches_errors(validator: Draft3Validator) -> None:
    broken = registration_response()
    del broken["name"]
    broken["permissions"]["device_identities"][0]["type"] = "palm_print"
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    assert "name" in messages and "palm_print" in messages


def test_registration_response_validates(validator: Draft3Validator) -> None:
    response = registration_response()
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(response)]
    assert errors == []


def test_registration_declares_what_the_service_needs() -> None:
    response = registration_response()
    assert response["type"] == "module_registration_response"
    assert response["firehose_version"] == response["sdk_version"] == "3.2.0"
    assert len(response["description"]) < 230
    for section in ("event_processing_registration", "audience_processing_registration"):
        api_key = [s for s in response[section]["account_settings"] if s["id"] == "apiKey"]
        assert api_key and api_key[0]["type"] == "text" and api_key[0]["confidential"] is True
    assert response["audience_processing_registration"]["audience_subscription_settings"]
    assert response["dsr_processing_registration"]["supported_dsr_types"] == ["erasure"]
