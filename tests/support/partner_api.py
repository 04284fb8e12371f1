"""Requests to the reference partner API (docs/partner-api.md), for the partner stub's tests of both tiers."""

from __future__ import annotations

import uuid
from typing import Any

API_KEY = "test-api-key-0001"
OTHER_API_KEY = "test-api-key-0002"


def headers(api_key: str | None = API_KEY, idempotency_key: str | None = None) -> dict[str, str]:
    result = {"Content-Type": "application/json"}
    if api_key is not None:
        result["Authorization"] = f"Bearer {api_key}"
    result["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
    return result


_IDS = uuid.UUID("6f1d1b36-3c5e-4d5e-9a51-2f0c6a0b8e11")


def eid(name: str) -> str:
    """A readable test event name as the UUID the contract wants for an event id."""
    return str(uuid.uuid5(_IDS, name))


def events_body(*names: str) -> dict[str, Any]:
    """One batch in the contract's shape (the stub checks it against events.schema.json): one
    custom_event per name, its id eid(name)."""
    return {
        "batches": [
            {
                "message_id": str(uuid.uuid4()),
                "account_id": 123,
                "timestamp_ms": 1714592744066,
                "firehose_version": "3.2.0",
                "source_id": None,
                "source_channel": "native",
                "user": {
                    "mpid": "-5227515829034156637",
                    "user_identities": [{"type": "customer", "encoding": "raw", "value": "c-1"}],
                    "device_identities": [],
                    "partner_identities": [],
                    "attributes": {"plan": "gold"},
                    "attribute_lists": {"tags": ["x", "y"]},
                },
                "device": {"type": "ios"},
                "device_application_stamp": None,
                "integration_attributes": {},
                "platform_fields": None,
                "consent_state": None,
                "system_notifications": [],
                "events": [
                    {"id": eid(name), "type": "custom_event", "timestamp_ms": 1714592744066, "name": name}
                    for name in names
                ],
            }
        ]
    }


def user(mpid: str | None = None, email: str | None = None) -> dict[str, Any]:
    identities = [{"type": "email", "encoding": "raw", "value": email}] if email else []
    return {
        "mpid": mpid,
        "user_identities": identities,
        "device_identities": [],
        "partner_identities": [],
    }
