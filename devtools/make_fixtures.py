"""Writes the project's own sample Firehose messages: tests/fixtures/messages/<version>/<File>.json.

    .venv/bin/python -m devtools.make_fixtures           # rewrite the folder
    .venv/bin/python -m devtools.make_fixtures --check   # fail if the folder differs from the generator

Every message is built from the field lists of the protocol notes (shared/firehose-protocol.md),
with synthetic values only: ids are derived from a hash of where they are used, people are
`@example.com` addresses and 555-01xx numbers, IP addresses come from the documentation ranges.
The folder and file names follow the SDK's sample corpus, so a test can ask for
`sample("3.2.0", "EventProcessingRequest_ios.json")` whichever corpus is at hand, and each version
folder shows what that protocol era looks like on the wire (§12, §15): the 1.x membership format
without actions, unversioned 2.0.0 files, `mpid` from 2.1.0, partner identities, CCPA, ATT, OAuth2,
DSR from 2.8.1, `custom_flags`, platform fields; every batch of the SDK's shape carries its consent
state, GDPR (and from 2.4.0 CCPA) notifications, integration attributes, source id and device
application stamp; plus int64 session ids beyond 2**53, unknown fields, every event type, and a
real-world-shaped batch (`observed/`, §13: as captured, without consent).

The output is deterministic: no clock, no randomness, so regenerating changes nothing unless this
file changed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.samples import FIXTURES

Message = dict[str, Any]

# Every firehose_version folder of the SDK's corpus, oldest first, with a plausible send date.
VERSION_DATES = {
    "1.x-unversioned": (2016, 6, 1),
    "2.0.0": (2018, 8, 15),
    "2.1.0": (2019, 3, 1),
    "2.1.1": (2019, 6, 3),
    "2.2.0": (2020, 1, 15),
    "2.3.0": (2020, 6, 1),
    "2.4.0": (2020, 11, 2),
    "2.5.0": (2021, 2, 1),
    "2.6.0": (2021, 5, 3),
    "2.7.0": (2022, 1, 17),
    "2.8.0": (2022, 6, 1),
    "2.8.1": (2023, 3, 1),
    "2.9.0": (2023, 7, 10),
    "2.9.1": (2023, 7, 25),
    "2.9.2": (2023, 8, 10),
    "2.9.3": (2023, 9, 20),
    "3.0.0": (2023, 11, 1),
    "3.1.0": (2024, 2, 1),
    "3.2.0": (2024, 5, 1),
}
VERSIONS = tuple(VERSION_DATES)
OBSERVED = "observed"
OBSERVED_FILE = "EventProcessingRequest_iterable_production_2.2.0.json"

# The hand-written batch of the early folders holds one of every event type; the SDK's
# generated iOS/Android batches replace it from 2.1.1 on.
HANDWRITTEN_UNTIL = "2.1.0"


def vkey(version: str) -> tuple[int, ...]:
    """Orderable form of a folder name; 1.x sorts before every 2.x."""
    if version == "1.x-unversioned":
        return (1, 11, 0)
    return tuple(int(part) for part in version.split("."))


def since(version: str, first: str) -> bool:
    return vkey(version) >= vkey(first)


# ------------------------------------------------------------------------ synthetic values


def digest(*parts: object) -> bytes:
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()


def fake_uuid(*parts: object) -> str:
    """A random-looking (version 4 shaped) UUID that only depends on `parts`."""
    return str(uuid.UUID(bytes=digest(*parts)[:16], version=4))


def fake_int64(*parts: object) -> int:
    """A signed 64-bit integer from `parts`, pushed beyond 2**53 so a double would lose it."""
    value = int.from_bytes(digest(*parts)[:8], "big", signed=True)
    return value if abs(value) > 2**60 else value - 2**62


def fake_hex(length: int, *parts: object) -> str:
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:length]


def md5(text: str) -> str:
    return hashlib.md5(text.strip().lower().encode()).hexdigest()  # the protocol hashes with md5; nothing secret here


def sha256(text: str) -> str:
    return hashlib.sha256(text.strip().lower().encode()).hexdigest()


class Person:
    """One synthetic user: example.com mail, 555-01xx phone, ids derived from a seed."""

    def __init__(self, seed: str, number: int) -> None:
        self.seed = seed
        self.email = f"fixture.user{number:04d}@example.com"
        self.customer_id = f"cust-{number:06d}"
        self.phone = f"+1-202-555-01{number % 100:02d}"
        self.first_name = "Fixture"
        self.last_name = f"User{number:04d}"
        self.mpid = str(fake_int64(seed, "mpid"))
        self.idfa = fake_uuid(seed, "idfa").upper()
        self.idfv = fake_uuid(seed, "idfv").upper()
        self.gaid = fake_uuid(seed, "gaid")
        self.android_id = fake_hex(16, seed, "android_id")
        self.push_token = fake_hex(64, seed, "push_token")


class Clock:
    """Timestamps of one folder: its date at 12:00 UTC, a few milliseconds apart per message."""

    def __init__(self, version: str) -> None:
        year, month, day = VERSION_DATES.get(version, (2020, 7, 27))
        start = dt.datetime(year, month, day, 12, 0, 0, tzinfo=dt.UTC)
        self.ms = int(start.timestamp() * 1000) + 417
        self.step = 0

    def next(self) -> int:
        self.step += 1
        return self.ms + self.step


# ---------------------------------------------------------------------- shared building blocks


def envelope(kind: str, version: str, clock: Clock, name: str, *, versioned: bool = True) -> Message:
    message: Message = {"type": kind, "id": fake_uuid(version, name, "id"), "timestamp_ms": clock.next()}
    if versioned and since(version, "2.0.0"):
        message["firehose_version"] = version
    return message


def identity(kind: str, value: str, encoding: str = "raw") -> dict[str, str]:
    return {"type": kind, "encoding": encoding, "value": value}


def user_identities(person: Person, version: str, *, many: bool = True) -> list[dict[str, str]]:
    found = [identity("email", md5(person.email), "md5"), identity("customer", sha256(person.customer_id), "sha256")]
    if many:
        found += [
            identity("google", f"g-{fake_hex(12, person.seed, 'google')}"),
            identity("facebook", f"fb-{fake_hex(12, person.seed, 'facebook')}"),
            identity("other", f"other-{fake_hex(8, person.seed, 'other')}"),
        ]
        if since(version, "2.4.0"):  # other5..other10 and the phone numbers are 2.4 (§3.1)
            found.append(identity("mobile_number", sha256(person.phone), "sha256"))
    return found


def partner_identities(person: Person, kind: str) -> list[dict[str, str]]:
    return [identity(kind, f"pid-{fake_hex(10, person.seed, 'partner')}")]


def account(version: str, *, api_key: bool, extra: dict[str, str | None] | None = None) -> Message:
    settings: dict[str, str | None] = {}
    if api_key:
        settings["apiKey"] = f"fixture-api-key-{version}"
    settings.update({"listName": "Fixture List", "sendRawIdentities": "false", "batchSize": "100"})
    settings.update(extra or {})
    return {
        "account_id": 40000 + VERSIONS.index(version) if version in VERSIONS else 42001,
        "account_settings": settings,
    }


def consent(consented: bool, when: int, document: str) -> Message:
    return {
        "consented": consented,
        "document": document,
        "timestamp_unixtime_ms": when,
        "location": "fixture://consent-banner",
        "hardware_id": "fixture-hardware-id",
    }


def consent_parts(version: str, clock: Clock) -> tuple[Message, list[Message]]:
    """The batch's consent_state and the system notifications that changed it (GDPR; CCPA from 2.4)."""
    when = clock.ms
    state: Message = {"gdpr_consent_state": {"marketing": consent(True, when, "privacy-policy-v3")}}
    notes: list[Message] = [
        {
            "type": "gdpr_consent_state",
            "purpose": "marketing",
            "old_gdpr_consent_state": consent(False, when - 60_000, "privacy-policy-v2"),
            "new_gdpr_consent_state": consent(True, when, "privacy-policy-v3"),
        }
    ]
    # The SDK's 2.4.0 sample already shows CCPA, released in 2.5.0 (§15).
    if since(version, "2.4.0"):
        state["ccpa_consent_state"] = {"data_sale_opt_out": consent(False, when, "ccpa-notice-v1")}
        notes.append(
            {
                "type": "ccpa_consent_state",
                "purpose": "data_sale_opt_out",
                "old_ccpa_consent_state": consent(True, when - 60_000, "ccpa-notice-v1"),
                "new_ccpa_consent_state": consent(False, when, "ccpa-notice-v1"),
            }
        )
    return state, notes


def location(n: int) -> Message:
    return {"latitude": 38.8895 + n / 1000, "longitude": -77.0353 - n / 1000, "accuracy": 15.0}


def user_attributes(person: Person) -> dict[str, str]:
    return {
        "$FirstName": person.first_name,
        "$LastName": person.last_name,
        "$Gender": "F",
        "$City": "Exampleville",
        "$State": "ZZ",
        "$Zip": "00000",
        "$Country": "ZZ",
        "$Mobile": person.phone,
        "plan": "gold",
    }


def product(seed: str, n: int, *, price: float, quantity: float) -> Message:
    return {
        "id": f"sku-{n:04d}",
        "name": f"Fixture Product {n}",
        "brand": "Fixture Brand",
        "category": "Fixtures",
        "variant": "blue",
        "coupon_code": f"SAVE{n}",
        "position": n,
        "price": price,
        "quantity": quantity,
        "total_amount": round(price * quantity, 2),
        "attributes": {"seed": fake_hex(6, seed, "product", n)},
    }


# --------------------------------------------------------------------------------- events


def base_event(
    kind: str, version: str, seed: str, n: int, clock: Clock, session_id: int | None, **extra: Any
) -> Message:
    event: Message = {"type": kind, "id": fake_uuid(version, seed, "event", n), "timestamp_ms": clock.next()}
    event["source_id"] = fake_uuid(version, seed, "event-source", n)
    if session_id is not None:
        event["session_id"] = session_id
    event.update(extra)
    return event


def every_event_type(version: str, seed: str, clock: Clock, person: Person) -> list[Message]:
    """One of each of the 16 event types of §6.3 (two promotion actions), as a hand-written batch
    of the early SDK had nearly all of them. Two sessions, both int64 ids beyond 2**53."""
    first, second = fake_int64(version, seed, "session", 1), fake_int64(version, seed, "session", 2)
    products = [product(seed, 1, price=19.99, quantity=4.0), product(seed, 2, price=5.5, quantity=1)]
    payload = json.dumps({"aps": {"alert": "Fixture push"}, "itbl": {"campaignId": 1001}}, separators=(",", ":"))
    spec: list[tuple[str, int | None, dict[str, Any]]] = [
        ("session_start", first, {"location": location(1)}),
        (
            "application_state_transition",
            first,
            {
                "application_state": "install",
                "launch_referral": "fixtureapp://open?campaign=spring",
                "referral_application": "com.example.referrer",
                "launch_parameters": "utm_source=fixture",
                "source_package": "com.example.launcher",
            },
        ),
        ("screen_view", first, {"screen_name": "Home", "attributes": {"tab": "featured"}}),
        (
            "custom_event",
            first,
            {
                "location": location(2),
                "name": "Transaction 7",
                "custom_event_type": "transaction",
                "attributes": {"amount": "12.50", "currency": "USD"},
            },
        ),
        ("user_attribute_change", first, {"added": {"plan": "gold"}, "removed": {"trial": "true"}}),
        (
            "user_identity_change",
            first,
            {
                "added": [identity("email", md5(person.email), "md5")],
                "removed": [identity("other", "other-retired")],
            },
        ),
        ("privacy_setting_change", first, {"setting": "app_data_collection", "is_enabled": True}),
        ("push_subscription", first, {"action": "subscribe", "token": person.push_token}),
        ("push_message_receipt", first, {"payload": payload}),
        ("push_message_open", first, {"payload": payload}),
        (
            "error",
            first,
            {
                "message": "Fixture error 1022",
                "is_crash": True,
                "stack_trace": (
                    "java.lang.IllegalStateException: fixture\r\n\tat com.example.fixture.Main.run(Main.java:42)\r\n"
                ),
                "breadcrumbs": ["opened home", "tapped buy"],
                "attributes": {"screen": "Home"},
            },
        ),
        ("session_end", first, {"session_length_ms": 336000}),
        (
            "promotion_action",
            second,
            {
                "action": "view",
                "promotions": [
                    {"id": "promo-1", "name": "Spring Sale", "creative": "banner-a", "position": "top"},
                    {"id": "promo-2", "name": "Free Shipping", "creative": "banner-b", "position": "bottom"},
                ],
                "attributes": {"placement": "home"},
            },
        ),
        (
            "promotion_action",
            second,
            {
                "action": "click",
                "promotions": [{"id": "promo-1", "name": "Spring Sale", "creative": "banner-a", "position": "top"}],
            },
        ),
        (
            "impression",
            second,
            {
                "impressions": [{"impression_list_name": "Recommended", "products": products[:1]}],
                "attributes": {"list": "recommended"},
            },
        ),
        (
            "product_action",
            second,
            {
                "action": "purchase",
                "transaction_id": f"txn-{fake_hex(8, seed, 'txn')}",
                "affiliation": "Fixture Store",
                "currency_code": "USD",
                "coupon_code": "SPRING",
                "total_amount": 85.46,
                "tax_amount": 5.0,
                "shipping_amount": 0.0,
                "products": products,
            },
        ),
        (
            "attribution",
            None,
            {
                "partner_name": "Fixture Ads",
                "publisher_name": "Example Publisher",
                "campaign_name": "spring-campaign",
                "attributes": {"click_id": fake_hex(10, seed, "click")},
            },
        ),
    ]
    return [
        base_event(kind, version, seed, n, clock, session, **extra) for n, (kind, session, extra) in enumerate(spec)
    ]


def sdk_events(version: str, seed: str, clock: Clock) -> list[Message]:
    """The two events of the SDK's generated batches: a custom event and an add-to-cart."""
    session = fake_int64(version, seed, "session")
    custom: Message = {
        "location": location(3),
        "name": "Viewed Offer",
        "custom_event_type": "navigation",
        "attributes": {"offer": "spring", "position": "2"},
    }
    cart: Message = {
        "action": "add_to_cart",
        "transaction_id": f"txn-{fake_hex(8, seed, 'txn')}",
        "total_amount": 11,
        "tax_amount": 1,
        "shipping_amount": 0,
        "currency_code": "USD",
        "coupon_code": "SPRING",
        "products": [product(seed, 1, price=10, quantity=1)],
        "attributes": {"cart": "main"},
    }
    # The SDK's 3.0.0 sample already shows custom_flags, released in 3.1.0 (§15).
    if since(version, "3.0.0"):
        custom["custom_flags"] = {"Fixture.flagA": "on", "Fixture.flagB": "7"}
        cart["custom_flags"] = {"Fixture.flagA": "off"}
    return [
        base_event("custom_event", version, seed, 0, clock, session, **custom),
        base_event("product_action", version, seed, 1, clock, session, **cart),
    ]


# ------------------------------------------------------------------------ runtime environments


def ios_runtime(version: str, person: Person, clock: Clock, *, handwritten: bool = False) -> Message:
    runtime: Message = {
        "type": "ios",
        "client_ip_address": "203.0.113.24",
        "sdk_version": "6.12.1" if not handwritten else "5.4.0",
        "identities": [identity("ios_advertising_id", person.idfa), identity("ios_vendor_id", person.idfv)],
    }
    if handwritten:
        runtime["is_debug"] = True
    if since(version, "2.1.0"):
        runtime["http_header_user_agent"] = "FixtureApp/2.0 (iPhone; iOS 15.0; Scale/3.00)"
    runtime.update(
        {
            "build_id": "fixture-build-1",
            "brand": "Apple",
            "product": "iPhone",
            "name": "Fixture iPhone",
            "manufacturer": "Apple",
            "os_version": "15.0",
            "model": "iPhone13,2",
            "screen_height": 2532,
            "screen_width": 1170,
            "country": "ZZ",
            "locale_language": "en",
            "locale_country": "en_ZZ",
            "network_country": "ZZ",
            "network_carrier": "Fixture Mobile",
            "network_code": "001",
            "network_mobile_country_code": "001",
            "timezone_offset": -5,
            "timezone_name": "UTC-5",
            "cpu_architecture": "arm64",
            "is_tablet": False,
            "radio_access_technology": "CTRadioAccessTechnologyLTE",
            "application_name": "Fixture App",
            "application_version": "2.0.1",
            "application_package": "com.example.fixtureapp",
            "is_sandboxed": True,
            "apple_search_ads_attribution": {
                "Version3.1": {
                    "iad-attribution": "true",
                    "iad-org-name": "Fixture Org",
                    "iad-campaign-id": "1001",
                    "iad-campaign-name": "spring-campaign",
                    "iad-adgroup-id": "2002",
                    "iad-adgroup-name": "fixture-group",
                    "iad-keyword": "fixture",
                    "iad-clickdate": "2020-01-01T00:00:00Z",
                    "iad-conversion-date": "2020-01-01T00:05:00Z",
                }
            },
        }
    )
    # The SDK's 2.5.0 sample already shows the ATT fields, released in 2.6.0 (§15).
    if since(version, "2.5.0"):
        runtime["att_authorization_status"] = "authorized"
        runtime["att_timestamp_unixtime_ms"] = clock.ms - 86_400_000
    return runtime


def android_runtime(version: str, person: Person) -> Message:
    runtime: Message = {
        "type": "android",
        "client_ip_address": "198.51.100.7",
        "sdk_version": "5.15.0",
        "identities": [
            identity("android_id", person.android_id),
            identity("google_advertising_id", person.gaid),
            identity("google_cloud_messaging_token", person.push_token),
        ],
        "http_header_user_agent": "Dalvik/2.1.0 (Linux; U; Android 12; Fixture Pixel)",
        "build_id": "SP1A.210812.015",
        "brand": "Fixture",
        "product": "fixture_pixel",
        "name": "Fixture Pixel",
        "manufacturer": "Fixture Devices",
        "os_version": "12",
        "model": "Fixture Pixel 6",
        "screen_height": 2400,
        "screen_width": 1080,
        "screen_dpi": 420,
        "country": "ZZ",
        "locale_language": "en",
        "locale_country": "en_ZZ",
        "network_country": "ZZ",
        "network_carrier": "Fixture Mobile",
        "network_code": "001",
        "network_mobile_country_code": "001",
        "timezone_offset": -8,
        "timezone_name": "UTC-8",
        "is_tablet": False,
        "supports_telephony": True,
        "has_nfc": True,
        "bluetooth_enabled": False,
        "bluetooth_version": "5.0",
        "android_sdk_level": 31,
        "application_name": "Fixture App",
        "application_version": "2.0.1",
        "application_package": "com.example.fixtureapp",
        "install_referrer": "utm_source%3Dfixture%26utm_medium%3Dcpc%26utm_campaign%3Dspring",
    }
    return runtime


# --------------------------------------------------------------------------------- messages


def setting_text(setting_id: str, name: str, description: str, *, confidential: bool = False) -> Message:
    return {
        "type": "text",
        "id": setting_id,
        "name": name,
        "description": description,
        "visible": True,
        "required": True,
        "confidential": confidential,
    }


def oauth(prefix: str) -> Message:
    return {
        "type": "oauth2",
        "authorization_url": f"https://auth.example.com/{prefix}/authorize",
        "refresh_url": f"https://auth.example.com/{prefix}/refresh",
        "token_url": f"https://auth.example.com/{prefix}/token",
        "grant_type": "authorization_code",
        "default_expires_in": 3600,
        "client_id": f"fixture-{prefix}-client",
        "access_token_type": "custom_header",
        "custom_header_name": "X-Fixture-Token",
        "param_client_id_name": "client_id",
        "param_secret_name": "client_secret",
        "scopes": [{"name": f"{prefix}.write", "description": f"Send {prefix} data"}],
    }


def registration_request(version: str, clock: Clock) -> Message:
    return envelope("module_registration_request", version, clock, "ModuleRegistrationRequest")


def registration_response(version: str, clock: Clock) -> Message:
    message = envelope("module_registration_response", version, clock, "ModuleRegistrationResponse")
    message.update({"sdk_version": version if since(version, "2.0.0") else "1.2.4"})
    message.update(
        {
            "name": "Fixture Partner",
            "description": "A <a href='https://example.com/fixture'>fixture</a> integration for tests.",
            "version": "1.0",
        }
    )
    permissions: Message = {
        "device_identities": [
            {"type": "ios_advertising_id", "encoding": "raw", "required": True},
            {"type": "google_advertising_id", "encoding": "raw", "required": True},
        ],
        "user_identities": [
            {"type": "email", "encoding": "sha256", "required": False},
            {"type": "customer", "encoding": "raw", "required": False},
        ],
        "allow_access_location": True,
        "allow_user_attributes": True,
        "allow_consent_state": True,
    }
    if since(version, "2.1.1"):  # the SDK's 2.1.1 sample already shows partner identities (2.2.0)
        permissions["partner_identities"] = [{"type": "fixture_partner_id", "encoding": "raw", "required": False}]
        permissions["allow_access_mpid"] = True
    if since(version, "2.0.0"):
        permissions["allow_audience_user_attributes"] = True
    if since(version, "3.2.0"):
        permissions["allow_platform_fields"] = True
        permissions["allow_eventless_batches"] = True
    message["permissions"] = permissions
    events: Message = {
        "account_settings": [
            setting_text("apiKey", "API Key", "Secret key for the fixture API", confidential=True),
            setting_text("listName", "List Name", "Where users are listed"),
        ],
        "supported_event_types": ["custom_event", "product_action", "session_start", "session_end"],
        "supported_runtime_environments": ["ios", "android"],
        "supported_system_notification_types": ["gdpr_consent_state"],
        "max_data_age_hours": 24,
    }
    if since(version, "2.7.0"):  # the SDK's 2.7.0 sample already shows event OAuth2 (2.8.0)
        events["authentication"] = oauth("events")
    audiences: Message = {
        "account_settings": [setting_text("apiKey", "API Key", "Secret key for the fixture API", confidential=True)],
    }
    if since(version, "2.6.0"):  # audience OAuth2 (2.7.0) shows from the 2.6.0 sample on
        audiences["authentication"] = oauth("audiences")
    if since(version, "2.9.3"):  # bulk_configuration (3.0.0) shows from the 2.9.3 sample on
        audiences["bulk_configuration"] = {"bulk_forward_wait_for_messages": 5, "bulk_forward_wait_in_minutes": 15}
    if since(version, "2.4.0"):
        audiences["audience_subscription_settings"] = [
            {
                "type": "boolean",
                "id": "suppression",
                "name": "Suppression Audience",
                "description": "Use this audience to suppress messages.",
                "visible": True,
                "default_value": False,
                "checked": False,
            }
        ]
    else:
        audiences["audience_subscription_settings"] = [
            {
                "type": "integer",
                "id": "listId",
                "name": "List ID",
                "visible": False,
                "required": False,
                "min_value": 0,
                "max_value": 2147483647,
            }
        ]
    message["event_processing_registration"] = events
    message["audience_processing_registration"] = audiences
    if since(version, "2.9.3"):
        message["dsr_processing_registration"] = {
            "account_settings": [setting_text("webhookUrl", "Webhook URL", "Where erasures are confirmed")],
            "supported_dsr_types": ["erasure"],
            "domain": "dsr.example.com",
        }
    return message


def registration_response_text(version: str, clock: Clock) -> str:
    text = dump(registration_response(version, clock))
    if version == "1.x-unversioned":
        # The SDK's 1.x sample carries a `//` comment, so it is not JSON at all (§14.10): the relay
        # must answer such a body 400 invalid_json, and the suite needs one to prove it.
        text = text.replace(
            '"sdk_version": "1.2.4",', '"sdk_version": "1.2.4", // the SDK version this was written for'
        )
    return text


def handwritten_batch(version: str, clock: Clock) -> Message:
    """The early SDK's hand-written iOS batch: nearly every event type, a GDPR notification with the
    pre-1.10 `timestamp` key, no firehose_version (even in the 2.0.0 and 2.1.0 folders)."""
    name = "EventProcessingRequest"
    person = Person(f"{version}/{name}", 1)
    message = envelope("event_processing_request", version, clock, name, versioned=False)
    message["source_id"] = fake_uuid(version, name, "source")
    message["source_channel"] = "native"
    message["device_application_stamp"] = fake_uuid(version, name, "das")
    message["account"] = account(version, api_key=True, extra={"channelName": "@fixture"})
    message["user_identities"] = user_identities(person, version)
    message["user_attributes"] = user_attributes(person)
    # Since 1.2: what the client kit set for this partner (§6.1).
    message["integration_attributes"] = {"fixture_user_key": fake_hex(12, person.seed, "ia")}
    message["runtime_environment"] = ios_runtime(version, person, clock, handwritten=True)
    message["events"] = every_event_type(version, name, clock, person)
    message["system_notifications"] = [
        {
            "type": "gdpr_consent_state",
            "purpose": "marketing",
            "old_gdpr_consent_state": {
                "consented": False,
                "document": "policy-v1",
                "timestamp": 456,
                "location": "web",
            },
            "new_gdpr_consent_state": {"consented": True, "document": "policy-v2", "timestamp": 123, "location": "web"},
        }
    ]
    # The snapshot the notification led to (1.9+), its record still with the pre-1.10 `timestamp`.
    message["consent_state"] = {
        "gdpr_consent_state": {
            "marketing": {"consented": True, "document": "policy-v2", "timestamp": 123, "location": "web"}
        }
    }
    if since(version, "2.1.0"):
        message["mpid"] = person.mpid
    return message


def sdk_batch(version: str, clock: Clock, platform: str) -> Message:
    """The SDK's generated batch (2.1.1+) for one platform, with everything the version has."""
    name = f"EventProcessingRequest_{platform}"
    person = Person(f"{version}/{name}", 2 if platform == "ios" else 3)
    message = envelope("event_processing_request", version, clock, name)
    message["source_id"] = fake_uuid(version, name, "source")
    message["account"] = account(version, api_key=True)
    if not since(version, "2.2.0"):
        # Sent on the request until 2.2.0 and removed in 2.3.0 as unused (§6.1).
        message["event_connection_settings"] = [setting_text("listName", "List Name", "Where users are listed")]
    message["partner_identities"] = partner_identities(person, "fixture_partner_id")
    message["user_identities"] = user_identities(person, version)
    message["user_attributes"] = user_attributes(person)
    message["user_attribute_lists"] = {"interests": ["hiking", "chess"]}
    message["integration_attributes"] = {"fixture_user_key": fake_hex(12, person.seed, "ia")}
    if platform == "ios":
        message["runtime_environment"] = ios_runtime(version, person, clock)
    else:
        message["runtime_environment"] = android_runtime(version, person)
    message["events"] = sdk_events(version, name, clock)
    message["source_channel"] = "native"
    message["device_application_stamp"] = fake_uuid(version, name, "das")
    message["consent_state"], message["system_notifications"] = consent_parts(version, clock)
    message["mpid"] = person.mpid
    if since(version, "3.2.0"):
        message["platform_fields"] = {
            "mp_account_id": 40018,
            "mp_account_name": "Fixture Account",
            "workspace_id": 7001,
            "workspace_name": "Fixture Workspace",
            "input_name": f"Fixture {platform}",
            "app_name": "Fixture App",
            "app_version": "2.0.1",
            "dataplan_id": "fixture_plan",
            "dataplan_name": "Fixture Plan",
            "dataplan_version": 3,
        }
    if platform == "android":
        # Fields no SDK version knows: a newer mParticle may add them at any level (§11.4).
        message["x_fixture_future_field"] = {"added_in": "9.9.9", "values": [1, 2, 3]}
        message["events"][0]["x_fixture_future_event_field"] = "ignored"
    return message


def observed_batch() -> Message:
    """Shaped like the one real production capture (§13): type first, firehose_version last,
    null and "True" settings, stringly user attributes, an `unknown` runtime of zeros, session 0,
    no source ids or locations, a negative int64 mpid, empty lists. Values are synthetic."""
    version, name = "2.2.0", OBSERVED_FILE
    clock = Clock("observed")
    person = Person(f"{OBSERVED}/{name}", 9)
    message = envelope("event_processing_request", version, clock, f"{OBSERVED}/{name}", versioned=False)
    message["account"] = {
        "account_id": 42001,
        "account_settings": {
            "apiKey": "observed-fixture-key",
            "apnsProdIntegrationName": None,
            "apnsSandboxIntegrationName": None,
            "coerceStringsToScalars": "True",
            "gcmIntegrationName": None,
            "userIdField": "customerId",
        },
    }
    message["user_identities"] = [identity("email", person.email), identity("customer", "1003")]
    message["user_attributes"] = {"loves_pizza": "True", "$Mobile": person.phone}
    message["user_attribute_lists"] = {}
    message["runtime_environment"] = {
        "type": "unknown",
        "screen_height": 0,
        "screen_width": 0,
        "screen_dpi": 0,
        "is_debug": True,
        "identities": [],
    }
    events_at = clock.next()
    message["events"] = [
        {
            "type": "custom_event",
            "id": fake_uuid(OBSERVED, name, "event", n),
            "timestamp_ms": events_at,
            "session_id": 0,
            "name": "App Page View",
            "custom_event_type": "navigation",
            "attributes": {"mParticle Source Feed": "fixture-integration-tester"},
        }
        for n in range(5)
    ]
    message["source_channel"] = "partner"
    message["mpid"] = str(-abs(fake_int64(OBSERVED, "mpid")))
    message["device_application_stamp"] = fake_uuid(OBSERVED, name, "das")
    message["system_notifications"] = []
    message["firehose_version"] = version  # last, as captured
    return message


def subscription_request(version: str, clock: Clock) -> Message:
    message = envelope(
        "audience_subscription_request",
        version,
        clock,
        "AudienceSubscriptionRequest",
        versioned=since(version, "2.1.0"),
    )
    # The early samples carried the apiKey alone; 2.1.0 added the example settings.
    settings = account(version, api_key=True)
    if not since(version, "2.1.0"):
        settings["account_settings"] = {"apiKey": settings["account_settings"]["apiKey"]}
    message["account"] = settings
    message.update({"audience_id": 1234, "audience_name": "Fixture Low Engagement", "action": "add"})
    return message


def subscription_response(version: str, clock: Clock) -> Message:
    message = envelope(
        "audience_subscription_response",
        version,
        clock,
        "AudienceSubscriptionResponse",
        versioned=since(version, "2.1.0"),
    )
    message["audience_subscription_settings"] = {"listId": "fixture-list-1234", "suppression": "false"}
    return message


def audience(audience_id: int, name: str, **extra: Any) -> Message:
    return {
        "audience_id": audience_id,
        "audience_name": name,
        "audience_subscription_settings": {"listId": f"fixture-list-{audience_id}"},
        **extra,
    }


def membership_request(version: str, clock: Clock) -> Message:
    name = "AudienceMembershipChangeRequest"
    message = envelope("audience_membership_change_request", version, clock, name)
    message["account"] = account(version, api_key=False)
    person = Person(f"{version}/{name}", 4)

    def devices(p: Person) -> list[dict[str, str]]:
        return [
            identity("ios_advertising_id", p.idfa),
            identity("ios_vendor_id", p.idfv),
            identity("google_advertising_id", p.gaid),
            identity("android_id", p.android_id),
        ]

    if not since(version, "2.0.0"):
        # 1.x: no actions, added/removed lists; the same user in two profiles, the second
        # undoing the first (§9.1), so the last change for a user must win.
        other_device = Person(f"{version}/{name}/second-device", 4)
        first = [(456, "Fixture Audience A"), (789, "Fixture Audience B")]
        second = [(432, "Fixture Audience C"), (654, "Fixture Audience D")]
        message["user_profiles"] = [
            {
                "user_identities": user_identities(person, version, many=False),
                "device_identities": devices(person),
                "added_audiences": [audience(i, n) for i, n in first],
                "removed_audiences": [audience(i, n) for i, n in second],
            },
            {
                "user_identities": user_identities(person, version, many=False),
                "device_identities": devices(other_device),
                "added_audiences": [audience(i, n) for i, n in second],
                "removed_audiences": [audience(i, n) for i, n in first],
            },
        ]
        return message
    profile: Message = {
        "user_identities": user_identities(person, version, many=False),
        "device_identities": devices(person),
    }
    if since(version, "2.1.1"):
        profile["partner_identities"] = partner_identities(person, "fixture_partner_id")
    profile["audiences"] = [
        audience(456, "Fixture Audience A", action="add"),
        audience(
            789,
            "Fixture Audience B",
            action="attribute_update",
            user_attributes=[
                {"key": "lifetime_value", "value": "9999999", "action": "upsert"},
                {"key": "churned", "action": "delete"},
                # An empty entry, as the SDK's generator writes one (§14.10): dropped, not fatal.
                {},
            ],
        ),
        audience(654, "Fixture Audience D", action="delete"),
    ]
    if since(version, "2.1.0"):
        profile["mpid"] = person.mpid
    message["user_profiles"] = [profile]
    return message


def membership_response(version: str, clock: Clock) -> Message:
    message = envelope("audience_membership_change_response", version, clock, "AudienceMembershipChangeResponse")
    if since(version, "2.1.0"):
        message["suspend_subscription"] = False
    return message


def event_response(version: str, clock: Clock) -> Message:
    # Stamped from 2.1.1 on; the 2.1.0 SDK briefly put mpid on every envelope instead (§2).
    message = envelope(
        "event_processing_response", version, clock, "EventProcessingResponse", versioned=since(version, "2.1.1")
    )
    if version == "2.1.0":
        message["mpid"] = "0"
    return message


def dsr_request(version: str, clock: Clock) -> Message:
    name = "DsrProcessingRequest"
    message = envelope("dsr_processing_request", version, clock, name)
    person = Person(f"{version}/{name}", 5)
    # Decimal epoch seconds with a fraction, as the SDK's Instant serialiser writes them (§10.1).
    submitted = round((clock.ms + 250) / 1000 + 0.000235, 6)
    message.update(
        {
            "subject_request_id": fake_uuid(version, name, "subject-request"),
            "subject_request_type": "erasure",
            "submitted_time": submitted,
            "subject_identities": {
                "android_advertising_id": {"encoding": "raw", "value": person.gaid},
                "email": {"encoding": "raw", "value": person.email},
            },
            "api_version": "3.0",
            "regulation": "gdpr",
        }
    )
    return message


def dsr_response(version: str, clock: Clock) -> Message:
    return envelope("dsr_processing_response", version, clock, "DsrProcessingResponse")


# ---------------------------------------------------------------------------------- output


def dump(message: Message) -> str:
    # Pretty-printed like the SDK's samples (the benchmark sends one byte for byte).
    return json.dumps(message, indent=2, ensure_ascii=False) + "\n"


def folder(version: str) -> dict[str, str]:
    """File name -> text of one version folder, in the SDK's file set for that version."""
    clock = Clock(version)
    builders: list[tuple[str, Callable[[], str]]] = [
        ("ModuleRegistrationRequest.json", lambda: dump(registration_request(version, clock))),
        ("ModuleRegistrationResponse.json", lambda: registration_response_text(version, clock)),
    ]
    if vkey(version) <= vkey(HANDWRITTEN_UNTIL):
        builders.append(("EventProcessingRequest.json", lambda: dump(handwritten_batch(version, clock))))
    else:
        builders.append(("EventProcessingRequest_ios.json", lambda: dump(sdk_batch(version, clock, "ios"))))
        builders.append(("EventProcessingRequest_android.json", lambda: dump(sdk_batch(version, clock, "android"))))
    builders += [
        ("EventProcessingResponse.json", lambda: dump(event_response(version, clock))),
        ("AudienceSubscriptionRequest.json", lambda: dump(subscription_request(version, clock))),
        ("AudienceSubscriptionResponse.json", lambda: dump(subscription_response(version, clock))),
        ("AudienceMembershipChangeRequest.json", lambda: dump(membership_request(version, clock))),
        ("AudienceMembershipChangeResponse.json", lambda: dump(membership_response(version, clock))),
    ]
    # The SDK's 2.8.1 samples already show DSR, released in 2.9.0 (§15).
    if since(version, "2.8.1"):
        builders.append(("DsrProcessingRequest.json", lambda: dump(dsr_request(version, clock))))
        builders.append(("DsrProcessingResponse.json", lambda: dump(dsr_response(version, clock))))
    return {name: build() for name, build in builders}


def corpus() -> dict[str, str]:
    """Relative path -> text of every fixture."""
    files = {f"{version}/{name}": text for version in VERSIONS for name, text in folder(version).items()}
    # Compact and on one line, as it came off the wire.
    files[f"{OBSERVED}/{OBSERVED_FILE}"] = json.dumps(observed_batch(), separators=(",", ":")) + "\n"
    return files


def write(target: Path) -> None:
    """Replace `target` with exactly the generated files (a removed file disappears too)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".messages-", dir=target.parent))
    try:
        for relative, text in corpus().items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def differences(target: Path) -> list[str]:
    """What differs between `target` and the generator's output (empty when up to date)."""
    expected = corpus()
    actual = {str(p.relative_to(target)): p for p in target.glob("*/*.json")} if target.is_dir() else {}
    problems = [f"missing {name}" for name in sorted(set(expected) - set(actual))]
    problems += [f"not generated: {name}" for name in sorted(set(actual) - set(expected))]
    problems += [
        f"differs: {name}"
        for name in sorted(set(expected) & set(actual))
        if actual[name].read_text(encoding="utf-8") != expected[name]
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report differences instead of writing")
    parser.add_argument("--target", type=Path, default=FIXTURES, help=f"default {FIXTURES}")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences(args.target)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    write(args.target)
    print(f"wrote {len(corpus())} files under {args.target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
