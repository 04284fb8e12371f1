"""AWS Lambda entry: mParticle's Lambda integration invokes the function with the message itself.

The function answers through the same code as POST /firehose: `service.dispatch.dispatch`
checks and stores the message with the same Ingest extension (one Redis round trip, the raw
bytes in the inbox stream), and the same Celery workers deliver it from there.

What the invocation returns tells mParticle what to do:

* the response message (a dict), for a message accepted or answered (verification, registration);
* the error body `{"error": {"code", "message", "fields"?}}` for a 4xx: a permanent rejection,
  returned as a *successful* invocation so mParticle does not retry a message that will never pass;
* an exception (`RetryLater`) when Redis did not store the message, and for any other fault of
  ours: the invocation fails and mParticle invokes again with the same message, whose id the
  dedupe mark then recognises if the store did happen. (mParticle documents continual retries
  for a throttled invocation, not how it retries a failed one; a failed invocation is still the
  only way a function can say "not stored", and answering 2xx-like would lose the message.)

There is no token: IAM decides who may invoke the function, so every message is authorized.
Handler setting: `service.lambda_handler.handler`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask

from common.logging_setup import configure_logging
from schemas.errors import error_body
from service import create_app
from service.dispatch import dispatch, parse
from service.errors import ApiError
from service.ingest import app_ingest

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any], dict[str, Any]]


class RetryLater(Exception):
    """The message was not stored; failing the invocation makes mParticle send it again."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(f"{error.status} {error.code}: {error.message}")
        self.status = error.status
        self.code = error.code


def _body_of(event: Any) -> bytes:
    """The message's bytes, as they will sit in the inbox and reach the workers."""
    if isinstance(event, bytes | bytearray):
        return bytes(event)
    if isinstance(event, str):
        try:
            return event.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: not UTF-8, as the HTTP path says too
            raise ApiError(400, "invalid_json", "Body is not valid JSON: invalid UTF-8.") from None
    # The runtime already parsed the JSON. Serialise it back with the standard library, which
    # keeps integers past 64 bits and refuses NaN, so `parse` below rejects exactly what it
    # rejects over HTTP (orjson.dumps would turn NaN into null and fail on big integers).
    try:
        return json.dumps(event, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"Body is not valid JSON: {type(exc).__name__}.") from None


def make_handler(app: Flask) -> Handler:
    """A handler bound to one app's settings and Ingest (so one Redis pool per container)."""
    ingest = app_ingest(app)
    max_body_bytes: int = app.config["SETTINGS"].max_body_bytes
    registration = app.extensions["registration"]

    def handler(event: Any, context: Any) -> dict[str, Any]:
        request_id = getattr(context, "aws_request_id", None)
        message_id = event.get("id") if isinstance(event, dict) else None
        try:
            body = _body_of(event)
            if len(body) > max_body_bytes:
                raise ApiError(413, "payload_too_large", f"Body is larger than {max_body_bytes} bytes.")
            message = parse(body)
            if isinstance(message, dict):
                message_id = message.get("id")
            status, answer = dispatch(message, body, ingest, authorized=True, registration=registration)
        except ApiError as error:
            _log(request_id, message_id, error.status)
            if error.status >= 500:
                raise RetryLater(error) from None
            return error_body(error.code, error.message, error.fields)
        _log(request_id, message_id, status)
        return answer

    return handler


def _log(request_id: str | None, message_id: Any, status: int) -> None:
    # Ids and the status only: the message carries the customer's account_settings.
    message_id = message_id[:64] if isinstance(message_id, str) else None
    log.info(
        "lambda_message request_id=%s message_id=%s status=%s",
        request_id,
        message_id,
        status,
        extra={"event": "lambda_message", "request_id": request_id, "message_id": message_id, "status": status},
    )


# Built once per container at import (Lambda's init phase), from Settings.from_env() as the
# web builds it, so warm invocations reuse the app, its Ingest and its Redis connection.
# Logs go through the same JSON formatter and redaction filter as web and workers.
configure_logging("lambda")
handler: Handler = make_handler(create_app())
