"""Messages the tests build or pick from the sample corpora: the fixtures and, when this machine has
it, the SDK's corpus (tests/support/__init__.py: every_sample)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import every_sample


def samples_where(keep: Callable[[Any], bool]) -> list[tuple[Path, dict[str, Any]]]:
    """(path, message) of every sample file that parses as JSON and that `keep` keeps; `keep` sees
    whatever the file holds, not necessarily an object."""
    found = []
    for path in every_sample():
        try:
            message = json.loads(path.read_bytes())
        except ValueError:
            continue  # the corpora hold malformed bodies on purpose; no test here posts those
        if keep(message):
            found.append((path, message))
    return found


def envelope(kind: str, api_key: str, timestamp_ms: int, account_id: int) -> dict[str, Any]:
    """A bare message of `kind` with a fresh id: the fields every type has, and nothing of its own."""
    return {
        "type": kind,
        "id": str(uuid.uuid4()),
        "timestamp_ms": timestamp_ms,
        "firehose_version": "3.2.0",
        "account": {"account_id": account_id, "account_settings": {"apiKey": api_key}},
    }
