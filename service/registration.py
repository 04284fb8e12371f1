"""The module registration response (protocol §5), built from settings.

mParticle's review reads this document and imports it to list the integration, so what it says
is configuration, not code:

* the simple values come from REGISTRATION_* variables (common/config.py, .env.example): name,
  description, version, push messaging provider id, max data age;
* the structured parts (permissions, requested identities and their encodings, event types,
  account and audience settings, DSR types) come from module_registration.json beside this
  module, with the sections of REGISTRATION_FILE laid over it, key by key.

The result is checked against the SDK 3.2.0 shape here (no JSON Schema files needed), so a
mistake stops the process at start: Settings checks REGISTRATION_FILE when it is set, and the
app factory builds the registration once. The same settings always give the same document;
only the envelope's id and timestamp change between answers.

    python -m service.registration    # print the response the environment's settings give
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.config import Settings, SettingsError
from schemas.messages import FIREHOSE_VERSION, REGISTRATION_RESPONSE
from schemas.responses import response_envelope

DEFAULTS_FILE = Path(__file__).with_name("module_registration.json")

# The SDK 3.2.0 enums (protocol §3.1, §5.4, §5.6); tests/unit/test_registration.py compares them
# with the SDK's own JSON Schemas when the sample corpus is present.
DeviceIdentityType = Literal[
    "android_id",
    "google_advertising_id",
    "ios_advertising_id",
    "ios_vendor_id",
    "google_cloud_messaging_token",
    "apple_push_notification_token",
    "roku_advertising_id",
    "microsoft_advertising_id",
    "microsoft_publisher_id",
    "fire_advertising_id",
    "roku_publisher_id",
]
UserIdentityType = Literal[
    "other",
    "customer",
    "facebook",
    "twitter",
    "google",
    "microsoft",
    "yahoo",
    "email",
    "other2",
    "other3",
    "other4",
    "other5",
    "other6",
    "other7",
    "other8",
    "other9",
    "other10",
    "mobile_number",
    "phone_number_2",
    "phone_number_3",
]
Encoding = Literal["raw", "md5", "sha1", "sha256"]
EventType = Literal[
    "session_start",
    "session_end",
    "custom_event",
    "screen_view",
    "error",
    "privacy_setting_change",
    "user_attribute_change",
    "user_identity_change",
    "push_subscription",
    "application_state_transition",
    "push_message_receipt",
    "product_action",
    "promotion_action",
    "impression",
    "attribution",
    "push_message_open",
]
RuntimeEnvironment = Literal[
    "unknown", "android", "ios", "tvos", "mobileweb", "roku", "xbox", "firetv", "alexa", "smarttv"
]
SystemNotificationType = Literal["gdpr_consent_state", "ccpa_consent_state"]
DsrType = Literal["erasure"]

# The workers read the customer's partner API key from this account setting (a message without
# it is dead-lettered), and the subscription answer fills this audience setting (service/dispatch.py).
API_KEY_SETTING = "apiKey"
AUDIENCE_ID_SETTING = "partnerAudienceId"
# Only receipts whose push payload carries the provider id are forwarded (protocol §5.4).
PUSH_RECEIPT = "push_message_receipt"

SECTIONS = (
    "permissions",
    "event_processing_registration",
    "audience_processing_registration",
    "dsr_processing_registration",
)
# One place for each value: these come from the environment, never from a file.
FROM_ENVIRONMENT = {
    "name": "REGISTRATION_NAME",
    "description": "REGISTRATION_DESCRIPTION",
    "version": "REGISTRATION_VERSION",
    "push_messaging_provider_id": "REGISTRATION_PUSH_MESSAGING_PROVIDER_ID",
    "max_data_age_hours": "REGISTRATION_MAX_DATA_AGE_HOURS",
}


class RegistrationError(ValueError):
    """A registration file or value that mParticle's review would reject (or the relay cannot serve)."""


# ------------------------------------------------------------------------------ the shape
# Strict (no "true" for true, no 1 for "1") and closed (an unknown key is a typo, which the SDK
# would silently ignore and the review would see as a permission never granted).


class _Shape(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class DeviceIdentityPermission(_Shape):
    type: DeviceIdentityType
    encoding: Encoding
    required: bool = False


class UserIdentityPermission(_Shape):
    type: UserIdentityType
    encoding: Encoding
    required: bool = False


class PartnerIdentityPermission(_Shape):
    type: str = Field(min_length=1)
    encoding: Encoding
    required: bool = False


class Permissions(_Shape):
    device_identities: list[DeviceIdentityPermission] = []
    user_identities: list[UserIdentityPermission] = []
    # mParticle takes one partner identity, and its name can never change once registered (§3.1).
    partner_identities: list[PartnerIdentityPermission] = Field(default=[], max_length=1)
    allow_access_location: bool = False
    allow_access_ip_address: bool = False
    allow_access_device_application_stamp: bool = False
    allow_device_info: bool = False
    allow_user_attributes: bool = False
    allow_consent_state: bool = False
    allow_audience_user_attributes: bool = False
    allow_access_http_user_agent: bool = False
    allow_access_mpid: bool = False
    allow_platform_fields: bool = False
    allow_eventless_batches: bool = False


class _Setting(_Shape):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    description: str | None = None
    visible: bool = True


class TextSetting(_Setting):
    type: Literal["text"]
    required: bool = False
    confidential: bool = False
    default_value: str | None = None


class IntegerSetting(_Setting):
    type: Literal["integer"]
    required: bool = False
    default_value: int | None = None
    min_value: int | None = None
    max_value: int | None = None


class FloatSetting(_Setting):
    type: Literal["float"]
    required: bool = False
    default_value: float | None = None
    min_value: float | None = None
    max_value: float | None = None


class BooleanSetting(_Setting):
    # Boolean settings have no `required` (protocol §5.3).
    type: Literal["boolean"]
    checked: bool = False
    default_value: bool | None = None


Setting = Annotated[TextSetting | IntegerSetting | FloatSetting | BooleanSetting, Field(discriminator="type")]


class EventProcessing(_Shape):
    account_settings: list[Setting] = []
    event_connection_settings: list[Setting] = []
    supported_event_types: list[EventType] = []
    supported_runtime_environments: list[RuntimeEnvironment] = []
    supported_system_notification_types: list[SystemNotificationType] = []
    # Filled from the environment (FROM_ENVIRONMENT); declared so the built document passes.
    max_data_age_hours: int
    push_messaging_provider_id: str | None = Field(default=None, min_length=1)


class BulkConfiguration(_Shape):
    bulk_forward_wait_for_messages: int | None = Field(default=None, ge=0)
    bulk_forward_wait_in_minutes: int | None = Field(default=None, ge=0)


class AudienceProcessing(_Shape):
    account_settings: list[Setting] = []
    audience_subscription_settings: list[Setting] = []
    bulk_configuration: BulkConfiguration | None = None


class DsrProcessing(_Shape):
    account_settings: list[Setting] = []
    supported_dsr_types: list[DsrType] = []
    domain: str | None = Field(default=None, min_length=1)


# No `authentication` (OAuth2) block in any section: the workers authenticate to the partner
# with the apiKey account setting, and nothing in the relay could use an OAuth token.
class Registration(_Shape):
    name: str = Field(min_length=1)
    description: str | None = Field(default=None, max_length=229)  # "< 230 characters" (§5.1)
    version: str = Field(min_length=1)
    permissions: Permissions | None = None
    event_processing_registration: EventProcessing | None = None
    audience_processing_registration: AudienceProcessing | None = None
    dsr_processing_registration: DsrProcessing | None = None


# ------------------------------------------------------------------------------ building


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistrationError("no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RegistrationError(f"cannot read it ({type(error).__name__}: {error})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise RegistrationError(f"not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    if not isinstance(document, dict):
        raise RegistrationError("must be a JSON object with any of: " + ", ".join(SECTIONS))
    return document


def _lay_over(defaults: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` with each section's keys replaced by the file's; null leaves a section or key out."""
    out = copy.deepcopy(defaults)
    for section, value in overrides.items():
        if section in FROM_ENVIRONMENT:
            raise RegistrationError(f"{section}: set {FROM_ENVIRONMENT[section]} in the environment instead")
        if section not in SECTIONS:
            raise RegistrationError(f"{section}: unknown section (expected any of: {', '.join(SECTIONS)})")
        if value is None:
            out.pop(section, None)
            continue
        if not isinstance(value, dict):
            raise RegistrationError(f"{section}: must be an object (or null to leave the section out)")
        merged = out.setdefault(section, {})
        for key, item in value.items():
            if key in FROM_ENVIRONMENT:
                raise RegistrationError(f"{section}.{key}: set {FROM_ENVIRONMENT[key]} in the environment instead")
            if item is None:
                merged.pop(key, None)
            else:
                merged[key] = copy.deepcopy(item)
    return out


def _problem(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False)[:5]:
        # A setting's discriminator tag (`text`, `boolean`...) says nothing the index does not.
        loc = [str(part) for part in item["loc"] if part not in ("text", "integer", "float", "boolean")]
        given = "" if item["type"] in ("missing", "extra_forbidden") else f" (got {item['input']!r:.60})"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{'.'.join(loc)}: {message}{given}")
    more = error.error_count() - len(lines)
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def _check_rules(body: dict[str, Any], explicit_event_types: bool) -> None:
    """What the shape cannot say: the settings the relay reads, duplicates, the push receipt rule."""
    for section in ("event_processing_registration", "audience_processing_registration", "dsr_processing_registration"):
        if section not in body:
            continue
        settings = body[section].get("account_settings", [])
        api_key = [s for s in settings if s["id"] == API_KEY_SETTING]
        if not api_key or api_key[0]["type"] != "text" or api_key[0].get("confidential") is not True:
            raise RegistrationError(
                f"{section}.account_settings: must keep the {API_KEY_SETTING!r} setting (type text, "
                "confidential true): the workers send it to the partner API with every call"
            )
        for key in ("account_settings", "event_connection_settings", "audience_subscription_settings"):
            ids = [s["id"] for s in body[section].get(key, [])]
            if len(ids) != len(set(ids)):
                raise RegistrationError(f"{section}.{key}: a setting id is declared twice")
    audiences = body.get("audience_processing_registration")
    if audiences is not None and AUDIENCE_ID_SETTING not in {
        s["id"] for s in audiences.get("audience_subscription_settings", [])
    }:
        raise RegistrationError(
            f"audience_processing_registration.audience_subscription_settings: must declare "
            f"{AUDIENCE_ID_SETTING!r}: the relay answers every subscription with it"
        )
    for name, values in (body.get("permissions") or {}).items():
        if isinstance(values, list) and len({v["type"] for v in values}) != len(values):
            raise RegistrationError(f"permissions.{name}: an identity type is listed twice")
    events = body.get("event_processing_registration")
    if events is not None and "push_messaging_provider_id" not in events:
        types = events.get("supported_event_types", [])
        if PUSH_RECEIPT in types:
            if explicit_event_types:
                raise RegistrationError(
                    f"event_processing_registration.supported_event_types: {PUSH_RECEIPT} needs "
                    "REGISTRATION_PUSH_MESSAGING_PROVIDER_ID (mParticle forwards only receipts carrying it)"
                )
            # The default list offers it, but without a provider id mParticle would never send one.
            events["supported_event_types"] = [t for t in types if t != PUSH_RECEIPT]


def _without_false_flags(permissions: dict[str, Any]) -> dict[str, Any]:
    # As the SDK serialises them: an allow_* flag that is false is left out (omitted ≡ false).
    return {key: value for key, value in permissions.items() if not (key.startswith("allow_") and value is False)}


@cache
def build_registration(
    name: str,
    description: str,
    version: str,
    push_messaging_provider_id: str,
    max_data_age_hours: int,
    registration_file: str,
) -> Mapping[str, Any]:
    """The registration body (no envelope); raises RegistrationError. Cached: one per set of values.

    Callers must not change what it returns (registration_response copies it).
    """
    overrides: dict[str, Any] = {}
    if registration_file:
        overrides = _read(Path(registration_file))
    body = _lay_over(_read(DEFAULTS_FILE), overrides)
    events = body.get("event_processing_registration")
    if events is not None:
        events["max_data_age_hours"] = max_data_age_hours
        if push_messaging_provider_id:
            events["push_messaging_provider_id"] = push_messaging_provider_id
    explicit_event_types = "supported_event_types" in (overrides.get("event_processing_registration") or {})
    document: dict[str, Any] = {"name": name, "description": description, "version": version, **body}
    try:
        Registration.model_validate(document)
    except ValidationError as error:
        raise RegistrationError(_problem(error)) from None
    _check_rules(document, explicit_event_types)
    if "permissions" in document:
        document["permissions"] = _without_false_flags(document["permissions"])
    if not description:
        del document["description"]
    return document


def registration_for(settings: Settings) -> Mapping[str, Any]:
    """The registration body the settings describe; a bad REGISTRATION_FILE is a SettingsError
    naming it, so every process stops at start with the same one line as for any bad setting."""
    try:
        return build_registration(
            settings.registration_name,
            settings.registration_description,
            settings.registration_version,
            settings.registration_push_messaging_provider_id,
            settings.registration_max_data_age_hours,
            settings.registration_file,
        )
    except RegistrationError as error:
        raise SettingsError(
            [f"{Settings.env_name('registration_file')}={settings.registration_file!r}: {error}"]
        ) from None


def registration_response(registration: Mapping[str, Any]) -> dict[str, Any]:
    """What mParticle imports to list the integration and render its settings."""
    return response_envelope(
        REGISTRATION_RESPONSE,
        sdk_version=FIREHOSE_VERSION,
        # A copy, so no caller can change what the next registration answers.
        **copy.deepcopy(dict(registration)),
    )


def main() -> int:
    from common.config import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 1
    print(json.dumps(registration_response(registration_for(settings)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
