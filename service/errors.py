"""One JSON error shape for every error the service answers."""

from __future__ import annotations

import logging

import orjson
from flask import Flask, Response, g
from werkzeug.exceptions import HTTPException

from schemas.errors import error_body

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: the view raises it, the handler renders it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers or {}


def json_response(payload: object, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status=status, headers=headers, mimetype="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error_body(error.code, error.message, error.fields), error.status, error.headers)


def _code_for(exc: HTTPException) -> str:
    # "Request Entity Too Large" -> "request_entity_too_large"; stable because werkzeug's names are.
    names = {413: "payload_too_large"}
    return names.get(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"))


def _answer(error: ApiError) -> Response:
    # The code goes on the request's log line (service/request_log.py).
    g.error_code = error.code
    return error_response(error)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return _answer(error)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        headers = dict(exc.get_headers()) if exc.code == 405 else {}
        headers.pop("Content-Type", None)
        return _answer(ApiError(exc.code or 500, _code_for(exc), exc.description or exc.name, headers=headers))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # A 500 tells mParticle to retry, which is right for a fault of ours; the trace goes
        # to the log (never the request body), the caller gets the JSON shape only.
        log.exception("unhandled_error", extra={"event": "unhandled_error"})
        return _answer(ApiError(500, "internal_error", "Internal error; retry later."))
