"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

from flask import Blueprint, Response

from service.errors import json_response
from service.ingest import app_ingest

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process answers; says nothing of Redis, so a Redis outage does not restart web."""
    return json_response({"status": "ok"}, 200)


@bp.get("/readyz")
def readyz() -> Response:
    if app_ingest().ping():
        return json_response({"status": "ready"}, 200)
    return json_response(
        {"error": {"code": "unavailable", "message": "Redis is not reachable."}},
        503,
        {"Retry-After": "1"},
    )
