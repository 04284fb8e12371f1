"""What the /metrics tests of both tiers share: messages to count, key prefixes, reading a Prometheus
text exposition."""

from __future__ import annotations

import uuid

import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.support import sample


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample_ in family.samples:
            out[(sample_.name, tuple(sorted(sample_.labels.items())))] = sample_.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


TOKEN = "metrics-token"
AUTH = {"Authorization": f"Token {TOKEN}"}


def event_batch(events: bool = True) -> bytes:
    """The iOS fixture with a fresh id; without events (and notifications) it is verification traffic."""
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = str(uuid.uuid4())
    if not events:
        message["events"] = []
        message["system_notifications"] = []  # consent notifications alone are work
    return orjson.dumps(message)


def prefix() -> str:
    """A key prefix of a test's own, so its counters start at zero."""
    return f"tm{uuid.uuid4().hex[:10]}"
