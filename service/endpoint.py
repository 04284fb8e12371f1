"""POST /firehose as the WSGI server calls it: the request path without Flask's machinery.

Every Firehose request went through Flask's request and app contexts, URL matching, before,
after and teardown hooks and a Response object: in process, a 7 KB event batch cost 420 us through
Flask and costs 230 us here (bare Flask answering 202: 130 us). This
middleware answers a POST to /firehose (or /firehose/<anything>) that states its Content-Length
with the same functions the Flask view uses (service/dispatch.py), and does what the hooks did:
the request id (service/request_log.py), the log context, the `firehose_request` line, the
request metrics and one JSON error shape. Anything else, a chunked body included, goes on to
Flask (service/firehose.py answers those POSTs the same way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from common.config import Settings
from common.logging_setup import bind_log_context, reset_log_context
from schemas.errors import error_body
from service.auth import request_is_authorized
from service.body import read_sized_body
from service.dispatch import dispatch, parse
from service.errors import ApiError
from service.ingest import app_ingest
from service.metrics import observe_request
from service.request_log import REQUEST_ID_HEADER, finish_summary, message_fields, request_id_for

log = logging.getLogger("service.errors")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_PATH = "/firehose"
_STATUS_LINES = {code: f"{code} {phrase.upper()}" for code, phrase in HTTP_STATUS_CODES.items()}
_JSON = ("Content-Type", "application/json")
_INTERNAL = ApiError(500, "internal_error", "Internal error; retry later.")


def _routed_here(path: str) -> bool:
    """Whether Flask would route `path` to the Firehose view as it is (service/firehose.py:
    /firehose and /firehose/<path:...>): werkzeug's path converter takes no line break and no
    leading slash, and its map redirects a path with a doubled slash."""
    if path == _PATH:
        return True
    rest = path[len(_PATH) + 1 :]
    return path.startswith(_PATH + "/") and rest[:1] not in ("", "/") and "\n" not in rest and "//" not in rest


class FirehoseEndpoint:
    """WSGI middleware in front of the Flask app: POST /firehose with a Content-Length is answered here."""

    def __init__(self, app: Flask, flask_wsgi: WSGIApp) -> None:
        settings: Settings = app.config["SETTINGS"]
        self.flask_wsgi = flask_wsgi
        self.settings = settings
        self.ingest = app_ingest(app)
        self.registration = app.extensions["registration"]
        self.max_body = settings.max_body_bytes
        # Without a token only a registration may come, and it is tiny: a stranger gets no more
        # than UNAUTHENTICATED_MAX_BODY_BYTES of our memory and time.
        self.max_unauthenticated_body = min(settings.unauthenticated_max_body_bytes, settings.max_body_bytes)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH") or ""
        if (
            environ.get("REQUEST_METHOD") != "POST"
            or not _routed_here(environ.get("PATH_INFO") or "")
            or not length.isdigit()
            or "HTTP_TRANSFER_ENCODING" in environ
        ):
            return self.flask_wsgi(environ, start_response)
        return self._answer(environ, start_response, int(length))

    def _answer(self, environ: dict[str, Any], start_response: StartResponse, length: int) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID"))
        token = bind_log_context(request_id=request_id)
        fields: dict[str, Any] | None = None
        error_code: str | None = None
        headers: dict[str, str] = {}
        try:
            try:
                authorized = request_is_authorized(environ.get("HTTP_AUTHORIZATION"), self.settings)
                limit = self.max_body if authorized else self.max_unauthenticated_body
                body = read_sized_body(environ, length, limit, self.settings.body_read_timeout_seconds)
                message = parse(body)
                fields = message_fields(message)
                if fields is not None:
                    bind_log_context(**fields)
                status, answer = dispatch(
                    message, body, self.ingest, authorized=authorized, registration=self.registration
                )
                payload = orjson.dumps(answer)
            except ApiError as error:
                status, error_code, headers = error.status, error.code, error.headers
                payload = orjson.dumps(error_body(error.code, error.message, error.fields))
            except Exception:
                # A 500 tells mParticle to retry, which is right for a fault of ours; the trace goes
                # to the log (never the request body), the caller gets the JSON shape only.
                log.exception("unhandled_error", extra={"event": "unhandled_error"})
                status, error_code = _INTERNAL.status, _INTERNAL.code
                payload = orjson.dumps(error_body(_INTERNAL.code, _INTERNAL.message))
            message_type = fields.get("message_type") if fields else None
            observe_request(message_type, status, started)
            finish_summary(environ, status, {"error": error_code, **(fields or {})}, started)
        finally:
            reset_log_context(token)
        start_response(
            _STATUS_LINES.get(status, str(status)),
            [_JSON, ("Content-Length", str(len(payload))), *headers.items(), (REQUEST_ID_HEADER, request_id)],
        )
        return [payload]


def init_app(app: Flask) -> None:
    app.wsgi_app = FirehoseEndpoint(app, app.wsgi_app)  # type: ignore[method-assign]
