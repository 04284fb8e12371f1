"""The door's fast check of a batch's consent state, platform fields and notifications says yes
only where the schema would: it may send a good batch to the schema, never a bad one past it."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from schemas.envelope import _DOOR_BATCH, plainly_valid_batch_fields
from tests.support import SAMPLES

BATCHES = sorted(SAMPLES.glob("*/EventProcessingRequest*.json"))


def _variants(message: dict[str, Any]) -> list[dict[str, Any]]:
    out = [message]
    bad_values: list[Any] = [None, "x", 1, 1.5, True, [], {}, {"consented": "yes"}, {"consented": True, "document": 3}]
    for value in bad_values:
        for where in ("gdpr_consent_state", "ccpa_consent_state"):
            changed = copy.deepcopy(message)
            changed["consent_state"] = {where: {"purpose": value}}
            out.append(changed)
            changed = copy.deepcopy(message)
            changed["consent_state"] = {where: value}
            out.append(changed)
        for field in ("consent_state", "platform_fields", "system_notifications"):
            changed = copy.deepcopy(message)
            changed[field] = value
            out.append(changed)
        changed = copy.deepcopy(message)
        changed["platform_fields"] = {"mp_account_id": value, "app_name": value}
        out.append(changed)
    good = copy.deepcopy(message)
    good["consent_state"] = {
        "gdpr_consent_state": {"p": {"consented": True, "document": "d", "timestamp_unixtime_ms": 1, "location": None}},
        "ccpa_consent_state": {"data_sale_opt_out": {"consented": False, "timestamp": 2}},
    }
    good["platform_fields"] = {"mp_account_id": 1, "workspace_name": "w", "dataplan_version": None}
    good["system_notifications"] = []
    out.append(good)
    return out


@pytest.mark.parametrize("path", BATCHES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_fast_check_never_passes_what_the_schema_refuses(path: Any) -> None:
    fast_yes = 0
    for message in _variants(orjson.loads(path.read_bytes())):
        if plainly_valid_batch_fields(message):
            fast_yes += 1
            assert _DOOR_BATCH.validate(message) == {}, message
    assert fast_yes >= 2  # the sample itself and the well-formed variant take the fast way
