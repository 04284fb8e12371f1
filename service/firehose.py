"""The Firehose endpoint: parse, authenticate, check the envelope, dedupe + enqueue, answer.

Nothing here calls the partner: the answer must leave within mParticle's 100 ms budget,
and everything that can wait happens in the workers.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request
from marshmallow import ValidationError

from common.config import Settings
from schemas.envelope import load_envelope
from schemas.messages import (
    EVENTS,
    MEMBERSHIP,
    REGISTRATION,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    RESPONSES,
)
from schemas.responses import response_envelope
from service.auth import token_is_valid
from service.errors import ApiError, json_response
from service.ingest import IngestUnavailable, ingest
from service.registration import registration_response

log = logging.getLogger(__name__)

bp = Blueprint("firehose", __name__)


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson also refuses invalid UTF-8, NaN/Infinity, integers beyond 64 bits and
        # nesting deeper than 1024, so none of those gets further than this.
        raise ApiError(400, "invalid_json", f"Body is not valid JSON: {exc.msg}.") from None


def _has_work(kind: str, message: dict[str, Any]) -> bool:
    """False for verification traffic, which gets a normal answer and is not queued."""
    if kind == EVENTS:
        events = message.get("events")
        if events is not None and not isinstance(events, list):
            raise ApiError(400, "invalid_envelope", "Invalid message.", {"events": ["Not a valid list."]})
        return bool(events)
    if kind == MEMBERSHIP:
        profiles = message.get("user_profiles")
        if profiles is not None and not isinstance(profiles, list):
            raise ApiError(400, "invalid_envelope", "Invalid message.", {"user_profiles": ["Not a valid list."]})
        return bool(profiles)
    return True


@bp.post("/firehose")
@bp.post("/firehose/<path:_anything>")
def receive(_anything: str | None = None) -> Response:
    settings: Settings = current_app.config["SETTINGS"]
    authorized = token_is_valid(request.headers.get("Authorization"), settings.auth_tokens)
    # get_data enforces MAX_CONTENT_LENGTH (413), chunked bodies included.
    body = request.get_data(cache=False)
    message = _parse(body)

    kind = message.get("type") if isinstance(message, dict) else None
    # Registration must work without a token: mParticle needs its answer before it can issue one.
    if not authorized and kind != REGISTRATION:
        raise ApiError(
            401,
            "unauthorized",
            "Missing or wrong 'Authorization: Token <token>' header.",
            headers={"WWW-Authenticate": "Token"},
        )
    if kind in RESPONSE_TYPES:
        raise ApiError(400, "unsupported_type", f"'{kind}' is a response type; send a request.")
    if isinstance(kind, str) and kind not in REQUEST_TYPES:
        raise ApiError(400, "unknown_type", f"Unknown message type '{kind[:100]}'.")
    try:
        envelope = load_envelope(message)
    except ValidationError as exc:
        raise ApiError(400, "invalid_envelope", "Invalid message envelope.", exc.messages_dict) from None

    if kind == REGISTRATION:
        return json_response(registration_response(), 200)

    response_type, status = RESPONSES[kind]
    if _has_work(kind, message):
        message_id = str(envelope["id"]) if envelope.get("id") else None
        try:
            ingest.accept(message_id, kind, body)
        except IngestUnavailable as exc:
            log.warning(
                "ingest_unavailable",
                extra={"event": "ingest_unavailable", "message_id": message_id, "error": str(exc)},
            )
            raise ApiError(
                503, "unavailable", "Could not store the message; retry later.", headers={"Retry-After": "1"}
            ) from None
    return json_response(response_envelope(response_type, **_response_fields(kind)), status)


def _response_fields(kind: str) -> dict[str, Any]:
    if kind == MEMBERSHIP:
        return {"suspend_subscription": False}
    return {}
