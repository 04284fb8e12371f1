"""The module registration response, built from the declarative module_registration.json."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from schemas.messages import FIREHOSE_VERSION, REGISTRATION_RESPONSE
from schemas.responses import response_envelope

DESCRIPTION_FILE = Path(__file__).with_name("module_registration.json")


@cache
def _description() -> dict[str, Any]:
    return json.loads(DESCRIPTION_FILE.read_text(encoding="utf-8"))


def registration_response() -> dict[str, Any]:
    """What mParticle imports to list the integration and render its settings."""
    return response_envelope(
        REGISTRATION_RESPONSE,
        sdk_version=FIREHOSE_VERSION,
        # A copy, so no caller can change what the next registration answers.
        **copy.deepcopy(_description()),
    )
