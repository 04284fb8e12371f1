"""What a Firehose message gets: the checks, the enqueue and the answer, for any transport.

The HTTP view (service/firehose.py) and the Lambda handler (service/lambda_handler.py) both
call `dispatch`, so a message is treated the same whichever way mParticle sends it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from marshmallow import ValidationError

from schemas.envelope import carries_work, load_envelope
from schemas.messages import MEMBERSHIP, REGISTRATION, REQUEST_TYPES, RESPONSE_TYPES, RESPONSES, SUBSCRIPTION
from schemas.responses import response_envelope
from service.errors import ApiError
from service.ingest import Ingest, IngestUnavailable
from service.message_view import MessageView, view
from service.metrics import count_enqueue_failure, count_ingest
from service.registration import registration_response

log = logging.getLogger(__name__)


# orjson writes at most 254 levels of nesting (it reads 1024). Every partner payload is written
# with orjson (its idempotency key, its body), so a message nested deeper can never be delivered.
MAX_DEPTH = 254


def parse(body: bytes) -> Any:
    """The message, as far as the door reads it: a big event batch or membership change comes as
    a MessageView (service/message_view.py), anything else parsed whole."""
    message = view(body)
    if message is not None:
        return message
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson also refuses invalid UTF-8, NaN/Infinity and
        # nesting deeper than 1024, so none of those gets further than this.
        raise ApiError(400, "invalid_json", f"Body is not valid JSON: {exc.msg}.") from None


def _too_deep(message: Any) -> bool:
    """Whether the message nests deeper than orjson can write (MAX_DEPTH): a trial write.

    The write is exact and, for anything but a tiny body, cheaper than any scan of the raw
    bytes: counting the brackets (two passes of bytes.count) cost more than the write itself
    (about 90 us against 50 us for a 130 KB membership change, 390 against 300 us for a
    1,000-event batch), and any body of real size has more than MAX_DEPTH brackets, so it paid
    for both. Nothing orjson.loads returns fails to write except by depth: its numbers are
    within int64/uint64 or floats, its keys strings.
    """
    if isinstance(message, MessageView) and isinstance(message.get(message.items_field), list):
        # Its items are raw JSON, each checked by the worker (workers/repair.py): the rest here.
        message = {k: v for k, v in message.items() if k != message.items_field}
    try:
        orjson.dumps(message)
    except orjson.JSONEncodeError:
        return True
    return False


def _has_work(kind: str, message: dict[str, Any]) -> bool:
    """False for verification traffic, which gets a normal answer and is not queued (one rule,
    schemas.envelope.carries_work, which the door's apiKey check uses too)."""
    try:
        return carries_work(kind, message)
    except ValidationError as exc:
        raise ApiError(400, "invalid_envelope", "Invalid message envelope.", exc.messages_dict) from None


def _audience_account(envelope: dict[str, Any]) -> tuple[int, str | None]:
    """The account id and apiKey a membership change's suspension flag is kept under."""
    account = envelope["account"]
    return account["account_id"], (account.get("account_settings") or {}).get("apiKey")


def _response_fields(
    kind: str, message: dict[str, Any], envelope: dict[str, Any], ingest: Ingest, suspended: bool | None
) -> dict[str, Any]:
    if kind == SUBSCRIPTION:
        # mParticle stores these with the subscription and sends them back on membership
        # changes. The partner's list key is derived here, not fetched: a partner call has no
        # place inside mParticle's 100 ms budget.
        audience_id = message.get("audience_id")
        if message.get("action") in ("add", "update") and type(audience_id) is int:
            return {"audience_subscription_settings": {"partnerAudienceId": str(audience_id)}}
        return {}
    if kind == MEMBERSHIP:
        # mParticle pauses the connection until the customer fixes the credentials (spec §9.2).
        if suspended is None:  # verification traffic: nothing stored, so not asked yet
            suspended = ingest.suspended(*_audience_account(envelope))
        return {"suspend_subscription": suspended}
    return {}


def dispatch(
    message: Any, body: bytes, ingest: Ingest, *, authorized: bool, registration: Mapping[str, Any]
) -> tuple[int, dict[str, Any]]:
    """(status, response message) for a parsed message whose raw bytes are `body`.

    `registration` is the app's registration body (service.registration.registration_for).

    Raises ApiError for anything that is not a 2xx.
    """
    kind = message.get("type") if isinstance(message, dict) else None
    # Registration must work without a token: mParticle needs its answer before it can issue one.
    if not authorized and kind != REGISTRATION:
        raise ApiError(
            401,
            "unauthorized",
            "Missing or wrong 'Authorization: Token <token>' header.",
            headers={"WWW-Authenticate": "Token"},
        )
    # After the token: a caller without one learns nothing about the body (401 first).
    if _too_deep(message):
        raise ApiError(
            400, "invalid_json", f"Body nests deeper than {MAX_DEPTH} levels; nothing that deep can be sent on."
        )
    if isinstance(kind, str) and kind in RESPONSE_TYPES:
        raise ApiError(400, "unsupported_type", f"'{kind}' is a response type; send a request.")
    if isinstance(kind, str) and kind not in REQUEST_TYPES:
        raise ApiError(400, "unknown_type", f"Unknown message type '{kind[:100]}'.")
    try:
        envelope = load_envelope(message)
    except ValidationError as exc:
        raise ApiError(400, "invalid_envelope", "Invalid message envelope.", exc.messages_dict) from None

    if kind == REGISTRATION:
        return 200, registration_response(registration)

    response_type, status = RESPONSES[kind]
    suspended: bool | None = None
    if not _has_work(kind, message):
        count_ingest(kind, "verification")
    else:
        message_id = envelope.get("id")
        try:
            if kind == MEMBERSHIP:
                # The answer's suspension flag is read in the same round trip as the store.
                stored, suspended = ingest.accept_and_check(message_id, kind, body, *_audience_account(envelope))
            else:
                # Per account: mParticle's message ids are unique within an account, not across them.
                stored = ingest.accept(message_id, kind, body, envelope["account"]["account_id"])
        except IngestUnavailable as exc:
            count_enqueue_failure(kind)
            log.warning(
                "ingest_unavailable message_id=%s error=%s",
                message_id,
                exc,
                extra={"event": "ingest_unavailable", "message_id": message_id, "error": str(exc)},
            )
            raise ApiError(
                503, "unavailable", "Could not store the message; retry later.", headers={"Retry-After": "1"}
            ) from None
        count_ingest(kind, "queued" if stored else "duplicate")
    return status, response_envelope(response_type, **_response_fields(kind, message, envelope, ingest, suspended))
