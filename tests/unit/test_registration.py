"""The registration response validates against the SDK's 3.2.0 JSON Schema (draft 3).

The schemas come with the SDK's sample corpus, which a fresh clone does not have: the
validations here run only when it is present (tests.support.extra_corpus)."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft3Validator

from devtools.samples import sdk_schema_validators
from service.registration import registration_response
from tests.support import SAMPLES, extra_corpus

CORPUS = extra_corpus()
SCHEMA_DIR = CORPUS / "3.2.0" / "schema" if CORPUS else None


@pytest.fixture(scope="module")
def validator() -> Draft3Validator:
    if SCHEMA_DIR is None or not SCHEMA_DIR.is_dir():
        pytest.skip("no SDK schemas: the shared sample corpus is not on this machine")
    return sdk_schema_validators(SCHEMA_DIR)["ModuleRegistrationResponse"]


def test_sdk_sample_validates(validator: Draft3Validator) -> None:
    # Proves the validator setup itself: the SDK's own sample and our fixture have zero errors.
    assert CORPUS is not None
    for path in (
        CORPUS / "3.2.0" / "ModuleRegistrationResponse.json",
        SAMPLES / "3.2.0" / "ModuleRegistrationResponse.json",
    ):
        assert list(validator.iter_errors(json.loads(path.read_text()))) == [], path


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
