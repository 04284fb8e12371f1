"""The Firehose HTTP endpoint, as a Flask view.

Nothing here calls the partner: the answer must leave within mParticle's 100 ms budget,
and everything that can wait happens in the workers.

A POST that states its Content-Length never gets here: service/endpoint.py answers it in front
of Flask, with the same functions. This view answers the rest (a chunked body), and gives the
route its place in the URL map (405 for another method, the OpenAPI document).
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from common.config import Settings
from service.auth import request_is_authorized
from service.body import read_body
from service.dispatch import dispatch, parse
from service.errors import json_response
from service.ingest import app_ingest
from service.request_log import note_message

bp = Blueprint("firehose", __name__)


@bp.post("/firehose")
@bp.post("/firehose/<path:_anything>")
def receive(_anything: str | None = None) -> Response:
    settings: Settings = current_app.config["SETTINGS"]
    authorized = request_is_authorized(request.headers.get("Authorization"), settings)
    # Without a token only a registration may come, and it is tiny: a stranger gets no more
    # than UNAUTHENTICATED_MAX_BODY_BYTES of our memory and time.
    body = read_body(
        request,
        settings.body_read_timeout_seconds,
        None if authorized else settings.unauthenticated_max_body_bytes,
    )
    message = parse(body)
    note_message(message)
    status, answer = dispatch(
        message, body, app_ingest(), authorized=authorized, registration=current_app.extensions["registration"]
    )
    return json_response(answer, status)
