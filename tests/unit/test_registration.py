"""The registration response: built from settings, checked at start, valid for the SDK 3.2.0.

The relay's own shape checks (service/registration.py) run everywhere. The SDK's JSON Schemas
(draft 3) come with its sample corpus, which a fresh clone does not have: the validations
against them run only when it is present (tests.support.extra_corpus)."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from jsonschema import Draft3Validator

from common.config import Settings, SettingsError
from devtools.samples import sdk_schema_validators
from service import create_app
from service import registration as reg
from service.registration import registration_for, registration_response
from tests.support import SAMPLES, extra_corpus, sample

CORPUS = extra_corpus()
SCHEMA_DIR = CORPUS / "3.2.0" / "schema" if CORPUS else None
ENVELOPE = ("id", "timestamp_ms")
ALLOW_FLAGS = (
    "allow_access_location",
    "allow_access_ip_address",
    "allow_access_device_application_stamp",
    "allow_device_info",
    "allow_user_attributes",
    "allow_consent_state",
    "allow_audience_user_attributes",
    "allow_access_http_user_agent",
    "allow_access_mpid",
    "allow_platform_fields",
    "allow_eventless_batches",
)
# Every part of the format a partner may use: each setting type, the optional keys.
FULL_FILE: dict[str, Any] = {
    "permissions": {
        "device_identities": [{"type": "roku_advertising_id", "encoding": "sha1", "required": True}],
        "user_identities": [{"type": "phone_number_2", "encoding": "md5"}],
        "partner_identities": [{"type": "Acme_uid", "encoding": "raw", "required": False}],
        "allow_access_location": False,
    },
    "event_processing_registration": {
        "event_connection_settings": [
            {"type": "integer", "id": "batch", "name": "Batch", "required": False, "default_value": 5, "min_value": 1},
            {"type": "float", "id": "ratio", "name": "Ratio", "default_value": 0.5, "max_value": 1.0},
            {"type": "boolean", "id": "debug", "name": "Debug", "checked": False, "default_value": False},
            {"type": "text", "id": "region", "name": "Region", "visible": False, "default_value": "eu"},
        ],
        "supported_event_types": ["custom_event", "push_message_receipt"],
        "supported_runtime_environments": ["ios", "android"],
    },
    "audience_processing_registration": {"bulk_configuration": {"bulk_forward_wait_for_messages": 100}},
    "dsr_processing_registration": {"domain": "privacy.example.com"},
}


@pytest.fixture(scope="module")
def validators() -> dict[str, Draft3Validator]:
    if SCHEMA_DIR is None or not SCHEMA_DIR.is_dir():
        pytest.skip("no SDK schemas: the shared sample corpus is not on this machine")
    return sdk_schema_validators(SCHEMA_DIR)


@pytest.fixture(scope="module")
def validator(validators: dict[str, Draft3Validator]) -> Draft3Validator:
    return validators["ModuleRegistrationResponse"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No REGISTRATION_* variable from the shell running the tests."""
    for name in Settings.model_fields:
        if name.startswith("registration_"):
            monkeypatch.delenv(Settings.env_name(name), raising=False)
    return monkeypatch


def _file(tmp_path: Path, content: Any, name: str = "registration.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _response(**settings: Any) -> dict[str, Any]:
    return registration_response(registration_for(Settings(**settings)))


def _errors(validator: Draft3Validator, document: dict[str, Any]) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


# ------------------------------------------------------------------ the SDK's JSON Schema


def test_sdk_sample_validates(validator: Draft3Validator) -> None:
    # Proves the validator setup itself: the SDK's own sample and our fixture have zero errors.
    assert CORPUS is not None
    for path in (
        CORPUS / "3.2.0" / "ModuleRegistrationResponse.json",
        SAMPLES / "3.2.0" / "ModuleRegistrationResponse.json",
    ):
        assert list(validator.iter_errors(json.loads(path.read_text()))) == [], path


def test_validator_catches_errors(validator: Draft3Validator) -> None:
    broken = _response()
    del broken["name"]
    broken["permissions"]["device_identities"][0]["type"] = "palm_print"
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    assert "name" in messages and "palm_print" in messages


def test_registration_response_validates(validator: Draft3Validator) -> None:
    assert _errors(validator, _response()) == []


def test_every_part_of_the_format_validates(validators: dict[str, Draft3Validator], tmp_path: Path) -> None:
    response = _response(
        registration_file=_file(tmp_path, FULL_FILE),
        registration_push_messaging_provider_id="acme",
        registration_max_data_age_hours=-1,
    )
    assert _errors(validators["ModuleRegistrationResponse"], response) == []
    # The response's schema checks a setting only as the base Setting: each type against its own.
    for setting in response["event_processing_registration"]["event_connection_settings"]:
        assert _errors(validators[f"{setting['type'].capitalize()}Setting"], setting) == [], setting


def test_the_shape_checks_know_the_sdk_enums(validators: dict[str, Draft3Validator]) -> None:
    # The relay's own checks run without the corpus; here they are held to the SDK's schema.
    def enum(name: str, *path: str) -> list[str]:
        node: Any = validators[name].schema
        for step in path:
            node = node[step]
        return node["enum"]

    pairs = [
        (reg.DeviceIdentityType, enum("DeviceIdentityPermission", "properties", "type")),
        (reg.UserIdentityType, enum("UserIdentityPermission", "properties", "type")),
        (reg.Encoding, enum("PartnerIdentityPermission", "properties", "encoding")),
        (reg.EventType, enum("EventProcessingRegistration", "properties", "supported_event_types", "items")),
        (
            reg.RuntimeEnvironment,
            enum("EventProcessingRegistration", "properties", "supported_runtime_environments", "items"),
        ),
        (
            reg.SystemNotificationType,
            enum("EventProcessingRegistration", "properties", "supported_system_notification_types", "items"),
        ),
        (reg.DsrType, enum("DsrProcessingRegistration", "properties", "supported_dsr_types", "items")),
    ]
    for literal, sdk in pairs:
        assert sorted(typing.get_args(literal)) == sorted(sdk)
    permissions = validators["Permissions"].schema["properties"]
    assert set(reg.Permissions.model_fields) == set(permissions)


# ------------------------------------------------------------- the defaults (no corpus needed)


def test_registration_declares_what_the_service_needs() -> None:
    response = _response()
    assert response["type"] == "module_registration_response"
    assert response["firehose_version"] == response["sdk_version"] == "3.2.0"
    assert len(response["description"]) < 230
    for section in ("event_processing_registration", "audience_processing_registration", "dsr_processing_registration"):
        api_key = [s for s in response[section]["account_settings"] if s["id"] == "apiKey"]
        assert api_key and api_key[0]["type"] == "text" and api_key[0]["confidential"] is True
    subscription = response["audience_processing_registration"]["audience_subscription_settings"]
    assert [s["id"] for s in subscription] == ["partnerAudienceId"]
    assert response["dsr_processing_registration"]["supported_dsr_types"] == ["erasure"]


def test_the_default_offers_every_permission() -> None:
    permissions = _response()["permissions"]
    assert all(permissions[flag] is True for flag in ALLOW_FLAGS)
    assert permissions["device_identities"] and permissions["user_identities"]
    # The id the cookie-sync endpoint hands mParticle comes back as the cookie-sync partner identity.
    assert permissions["partner_identities"] == [{"type": "$cookie_sync_id", "encoding": "raw", "required": False}]


def test_the_default_passes_the_relays_own_checks() -> None:
    body = dict(registration_for(Settings()))
    assert reg.Registration.model_validate(body).name == "Firehose Relay"
    # No placeholder provider id: unset, it is left out, and so are receipts that would need it.
    events = body["event_processing_registration"]
    assert "push_messaging_provider_id" not in events
    assert "push_message_receipt" not in events["supported_event_types"]
    assert "push_message_open" in events["supported_event_types"]
    assert events["max_data_age_hours"] == 24


def test_the_simple_values_come_from_the_settings() -> None:
    response = _response(
        registration_name="Acme",
        registration_description="Acme's <a href='https://acme.example'>audiences</a>.",
        registration_version="2.3",
        registration_push_messaging_provider_id="acme",
        registration_max_data_age_hours=48,
    )
    assert (response["name"], response["version"]) == ("Acme", "2.3")
    assert response["description"] == "Acme's <a href='https://acme.example'>audiences</a>."
    events = response["event_processing_registration"]
    assert events["push_messaging_provider_id"] == "acme" and events["max_data_age_hours"] == 48
    assert "push_message_receipt" in events["supported_event_types"]


def test_the_environment_sets_them(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("REGISTRATION_NAME", "Acme Corp")
    clean_env.setenv("REGISTRATION_PUSH_MESSAGING_PROVIDER_ID", "acme")
    clean_env.setenv("REGISTRATION_FILE", _file(tmp_path, {"dsr_processing_registration": None}))
    body = registration_for(Settings.from_env())
    assert body["name"] == "Acme Corp" and "dsr_processing_registration" not in body


def test_same_settings_same_response() -> None:
    first, second = _response(), _response()
    assert first["id"] != second["id"]
    assert {k: v for k, v in first.items() if k not in ENVELOPE} == {
        k: v for k, v in second.items() if k not in ENVELOPE
    }
    # A caller changing an answer changes no later one.
    first["permissions"]["device_identities"].clear()
    first["event_processing_registration"]["supported_event_types"].append("x")
    assert _response()["permissions"]["device_identities"]
    assert "x" not in _response()["event_processing_registration"]["supported_event_types"]


# ---------------------------------------------------------------------- REGISTRATION_FILE


def test_a_file_replaces_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    response = _response(registration_file=_file(tmp_path, FULL_FILE), registration_push_messaging_provider_id="acme")
    permissions = response["permissions"]
    assert permissions["partner_identities"] == [{"type": "Acme_uid", "encoding": "raw", "required": False}]
    assert permissions["device_identities"] == [{"type": "roku_advertising_id", "encoding": "sha1", "required": True}]
    # A false flag is left out, as the SDK writes it (omitted means false); the others stay on.
    assert "allow_access_location" not in permissions and permissions["allow_eventless_batches"] is True
    events = response["event_processing_registration"]
    assert events["supported_event_types"] == ["custom_event", "push_message_receipt"]
    assert [s["id"] for s in events["account_settings"]] == ["apiKey"]  # the default's, kept
    audiences = response["audience_processing_registration"]
    assert audiences["bulk_configuration"] == {"bulk_forward_wait_for_messages": 100}
    assert [s["id"] for s in audiences["audience_subscription_settings"]] == ["partnerAudienceId"]
    assert response["dsr_processing_registration"]["domain"] == "privacy.example.com"


def test_null_leaves_a_section_or_a_key_out(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        {
            "audience_processing_registration": None,
            "dsr_processing_registration": None,
            "permissions": {"partner_identities": None},
        },
    )
    response = _response(registration_file=path)
    assert "audience_processing_registration" not in response and "dsr_processing_registration" not in response
    assert "partner_identities" not in response["permissions"]


def test_the_app_answers_with_the_settings(redis_url: str, tmp_path: Path) -> None:
    path = _file(tmp_path, {"permissions": {"allow_access_mpid": False}})
    settings = Settings(redis_url=redis_url, registration_name="Acme", registration_file=path)
    client: FlaskClient = create_app(settings).test_client()
    answer = client.post("/firehose", data=sample("3.2.0", "ModuleRegistrationRequest.json")).get_json()
    assert answer["type"] == "module_registration_response" and answer["name"] == "Acme"
    assert "allow_access_mpid" not in answer["permissions"]
    assert answer["permissions"]["allow_platform_fields"] is True


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        ("[]", "must be a JSON object"),
        ({"name": "Acme"}, "name: set REGISTRATION_NAME in the environment instead"),
        (
            {"event_processing_registration": {"push_messaging_provider_id": "x"}},
            "set REGISTRATION_PUSH_MESSAGING_PROVIDER_ID in the environment instead",
        ),
        ({"permission": {}}, "permission: unknown section"),
        ({"permissions": []}, "permissions: must be an object"),
        ({"permissions": {"allow_acess_location": True}}, "permissions.allow_acess_location: unknown key"),
        ({"permissions": {"allow_access_location": "true"}}, "permissions.allow_access_location: Input should be"),
        (
            {"permissions": {"device_identities": [{"type": "palm_print", "encoding": "raw"}]}},
            "permissions.device_identities.0.type: Input should be",
        ),
        (
            {"permissions": {"user_identities": [{"type": "email", "encoding": "base64"}]}},
            "permissions.user_identities.0.encoding",
        ),
        (
            {
                "permissions": {
                    "partner_identities": [{"type": "a", "encoding": "raw"}, {"type": "b", "encoding": "raw"}]
                }
            },
            "permissions.partner_identities: List should have at most 1 item",
        ),
        (
            {
                "permissions": {
                    "user_identities": [{"type": "email", "encoding": "raw"}, {"type": "email", "encoding": "md5"}]
                }
            },
            "permissions.user_identities: an identity type is listed twice",
        ),
        ({"event_processing_registration": {"account_settings": []}}, "must keep the 'apiKey' setting"),
        (
            {"dsr_processing_registration": {"account_settings": [{"type": "text", "id": "apiKey", "name": "Key"}]}},
            "dsr_processing_registration.account_settings: must keep the 'apiKey' setting",
        ),
        (
            {"audience_processing_registration": {"audience_subscription_settings": []}},
            "must declare 'partnerAudienceId'",
        ),
        (
            {"event_processing_registration": {"supported_event_types": ["push_message_receipt"]}},
            "push_message_receipt needs REGISTRATION_PUSH_MESSAGING_PROVIDER_ID",
        ),
        (
            {"event_processing_registration": {"supported_event_types": ["page_view"]}},
            "event_processing_registration.supported_event_types.0: Input should be",
        ),
        (
            {
                "event_processing_registration": {
                    "event_connection_settings": [{"type": "colour", "id": "c", "name": "C"}]
                }
            },
            "event_processing_registration.event_connection_settings.0: Input tag 'colour'",
        ),
        (
            {
                "event_processing_registration": {
                    "event_connection_settings": [{"type": "boolean", "id": "b", "name": "B", "required": True}]
                }
            },
            "event_connection_settings.0.required: unknown key",
        ),
        (
            {
                "event_processing_registration": {
                    "event_connection_settings": [
                        {"type": "text", "id": "x", "name": "X"},
                        {"type": "text", "id": "x", "name": "Y"},
                    ]
                }
            },
            "event_connection_settings: a setting id is declared twice",
        ),
        (
            {"audience_processing_registration": {"authentication": {"type": "oauth2"}}},
            "audience_processing_registration.authentication: unknown key",
        ),
    ],
)
def test_a_bad_file_stops_the_settings_with_its_reason(tmp_path: Path, content: Any, reason: str) -> None:
    path = _file(tmp_path, content)
    with pytest.raises(SettingsError) as caught:
        registration_for(Settings(registration_file=path))
    [line] = caught.value.problems
    assert line.startswith(f"REGISTRATION_FILE={path!r}: ") and reason in line, line


def test_a_missing_file_is_named(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("REGISTRATION_FILE", str(tmp_path / "nowhere.json"))
    with pytest.raises(SettingsError, match=r"REGISTRATION_FILE='.*nowhere.json': no such file"):
        registration_for(Settings.from_env())


@pytest.mark.parametrize(
    ("variable", "raw", "reason"),
    [
        ("REGISTRATION_DESCRIPTION", "x" * 230, "at most 229 characters"),
        ("REGISTRATION_MAX_DATA_AGE_HOURS", "0", "must be -1 (any age) or at least 1"),
        ("REGISTRATION_MAX_DATA_AGE_HOURS", "-2", "greater than or equal to -1"),
    ],
)
def test_a_bad_simple_value_names_its_variable(
    clean_env: pytest.MonkeyPatch, variable: str, raw: str, reason: str
) -> None:
    clean_env.setenv(variable, raw)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env()
    assert any(line.startswith(f"{variable}=") and reason in line for line in caught.value.problems), caught.value


def test_the_module_prints_the_response(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("REGISTRATION_NAME", "Acme")
    assert reg.main() == 0
    assert json.loads(capsys.readouterr().out)["name"] == "Acme"
    clean_env.setenv("REGISTRATION_MAX_DATA_AGE_HOURS", "0")
    assert reg.main() == 1
    assert "REGISTRATION_MAX_DATA_AGE_HOURS='0'" in capsys.readouterr().err
