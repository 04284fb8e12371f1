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


def events_body(*event_ids: str) -> dict[str, Any]:
    return {
        "batches": [
            {
                "message_id": str(uuid.uuid4()),
                "account_id": 123,
                "timestamp_ms": 1714592744066,
                "source_channel": "native",
                "user": {
                    "mpid": "-5227515829034156637",
                    "user_identities": [{"type": "email", "encoding": "raw", "value": "a@b.c"}],
                    "device_identities": [],
                    "partner_identities": [],
                    "attributes": {"plan": "gold"},
                    "attribute_lists": {"tags": ["x", "y"]},
                },
                "device": {"platform": "iOS"},
                "events": [
                    {
                        "id": event_id,
                        "type": "custom_event",
                        "timestamp_ms": 1714592744066,
                    }
                    for event_id in event_ids
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
