"""The door's plain-types fast paths and its schemas give the same answer, message by message.

`load_envelope` takes a fast way for the common shape (`_plain_envelope`, and for event batches
`plainly_valid_batch_fields`) and the marshmallow schemas for everything else. Whatever way a
message takes, the envelope it gets, or the error and the fields it names, must be the one the
schemas alone would give. Every fixture (and the SDK corpus when present) is run both ways,
as it is and with each field the door reads removed or given each JSON type in turn.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from marshmallow import ValidationError

import schemas.envelope as door
from schemas.messages import REQUEST_TYPES
from service.dispatch import MAX_DEPTH, _too_deep
from tests.support import SAMPLES, every_sample, sample_id


def _request_samples() -> list[Path]:
    out = []
    for path in every_sample():
        try:
            message = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            continue  # the corpus has a few annotated files; they are not messages
        if isinstance(message, dict) and message.get("type") in REQUEST_TYPES:
            out.append(path)
    return out


REQUESTS = _request_samples()
# The mutations run on the project's own fixtures (every message type of every version); the
# SDK corpus, when present, is compared as it is (test below): its files are the same shapes.
FIXTURE_REQUESTS = [p for p in REQUESTS if p.is_relative_to(SAMPLES)]

_MISSING = object()
# One of each JSON type, and the near misses the fast way has to notice: a numeric string, an
# integral float, a bool (an int to Python), a UUID in upper case, one with braces.
VALUES: list[Any] = [
    _MISSING,
    None,
    "x",
    "12",
    0,
    7,
    1.0,
    2.5,
    True,
    False,
    [],
    {},
    ["a"],
    {"a": 1},
    "FFFFFFFF-FFFF-4FFF-BFFF-FFFFFFFFFFFF",
    "{ffffffff-ffff-4fff-bfff-ffffffffffff}",
    "ffffffff-ffff-4fff-bfff-ffffffffffff",
]
# Where the door looks: the envelope, the account, its settings, and an event batch's fields.
PATHS: list[tuple[str, ...]] = [
    ("type",),
    ("id",),
    ("timestamp_ms",),
    ("account",),
    ("account", "account_id"),
    ("account", "account_settings"),
    ("account", "account_settings", "apiKey"),
    ("account", "account_settings", "other"),
    ("mpid",),
    ("events",),
    ("user_profiles",),
    ("system_notifications",),
    ("consent_state",),
    ("consent_state", "gdpr_consent_state"),
    ("consent_state", "gdpr_consent_state", "purpose"),
    ("consent_state", "gdpr_consent_state", "purpose", "consented"),
    ("consent_state", "gdpr_consent_state", "purpose", "document"),
    ("consent_state", "ccpa_consent_state", "data_sale_opt_out", "timestamp_unixtime_ms"),
    ("platform_fields",),
    ("platform_fields", "mp_account_id"),
    ("platform_fields", "app_name"),
]


def _set(message: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any] | None:
    """A copy with `path` set to `value` (removed for _MISSING); None when its parent is no object.

    Only the objects on the path are copied: the rest is shared with `message`, which no check
    changes (a deep copy of every big batch for every mutation would cost seconds)."""
    changed = dict(message)
    node: Any = changed
    for name in path[:-1]:
        child = node.get(name, {})
        if not isinstance(child, dict):
            return None
        node[name] = node = dict(child)
    if value is _MISSING:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = copy.deepcopy(value)
    return changed


def _mutations(message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield message
    for path in PATHS:
        for value in VALUES:
            changed = _set(message, path, value)
            if changed is not None:
                yield changed
    # The rare types with every envelope field of the common shape, so their own checks are run too.
    for kind in sorted(REQUEST_TYPES):
        changed = _set(message, ("type",), kind)
        if changed is not None:
            yield changed


def _outcome(message: Any) -> tuple[str, Any]:
    try:
        return "ok", door.load_envelope(message)
    except ValidationError as exc:
        return "refused", exc.messages


def _schemas_only(monkeypatch: pytest.MonkeyPatch, message: Any) -> tuple[str, Any]:
    # The fast ways turned off: every message goes through the marshmallow schemas.
    with monkeypatch.context() as patch:
        patch.setattr(door, "_plain_envelope", lambda _message: None)
        patch.setattr(door, "plainly_valid_batch_fields", lambda _message: False)
        return _outcome(message)


@pytest.mark.parametrize("path", FIXTURE_REQUESTS, ids=sample_id)
def test_fast_and_full_paths_agree_on_the_sample_and_its_mutations(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = orjson.loads(path.read_bytes())
    fast_envelopes = 0
    for case in _mutations(message):
        full = _schemas_only(monkeypatch, case)
        fast = _outcome(case)
        assert fast == full, case
        fast_envelopes += door._plain_envelope(case) is not None
    # Not a vacuous comparison: the fast way took many of them (every sample with an id, a
    # timestamp and an account, and each of its variants the common shape survives).
    if door._plain_envelope(message) is not None:
        assert fast_envelopes > len(VALUES)


def test_fast_and_full_paths_agree_on_every_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    for path in REQUESTS:
        message = orjson.loads(path.read_bytes())
        assert _outcome(message) == _schemas_only(monkeypatch, message), sample_id(path)


def test_the_fast_envelope_is_taken_by_the_common_shape() -> None:
    # The agreement above would hold trivially if the fast way never said yes.
    for path in REQUESTS:
        message = orjson.loads(path.read_bytes())
        if {"id", "timestamp_ms", "account"} <= message.keys() and "apiKey" in str(message["account"]):
            assert door._plain_envelope(message) is not None, sample_id(path)


def _nested(levels: int, opener: str) -> Any:
    # `levels` containers, one in another: a list or an object at each level, with a scalar
    # beside each inner container so that no run of brackets gives the depth away.
    value: Any = 1
    for _ in range(levels):
        value = [0, value] if opener == "[" else {"k": value, "s": 0}
    return value


@pytest.mark.parametrize("opener", ["[", "{"])
def test_the_depth_check_is_exact_at_the_limit(opener: str) -> None:
    for levels in (MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 600):
        message = {"x": orjson.loads(_dump_deep(_nested(levels, opener)))}
        # The message object is one level more than its deepest value.
        assert _too_deep(message) == (levels + 1 > MAX_DEPTH), levels


def _dump_deep(value: Any) -> bytes:
    # orjson cannot write past MAX_DEPTH; the standard library can.
    import json

    return json.dumps(value).encode()
