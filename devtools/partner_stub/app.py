"""Flask app of the partner stub: the reference partner API plus /_stub admin routes.

See docs/partner-api.md for the contract; every /v1 body is checked against its route's JSON
Schema (schemas/, through state.check_schema) before anything is applied. Security note: the
stub is handed customers' real API keys, so nothing here logs the Authorization header or a
request body; the request log exposes only the sha256 of the bearer token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from devtools.partner_stub.fault_rules import FaultConfigError, FaultRule, parse_rules
from devtools.partner_stub.state import (
    PayloadError,
    StoredResponse,
    StubState,
    load_validators,
    validate_audience,
    validate_audience_delete,
    validate_erasure,
    validate_events,
    validate_member_changes,
)

logger = logging.getLogger("partner_stub")

_NOT_JSON = object()


@dataclass
class StubConfig:
    """Configuration of one stub instance.

    `faults` has the shape of POST /_stub/faults: {"rules": [...]}.
    """

    faults: dict[str, Any] | None = None
    max_requests: int = 20_000

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> StubConfig:
        unknown = set(values) - {"faults", "max_requests"}
        if unknown:
            raise TypeError(f"unknown stub config keys: {sorted(unknown)}")
        return cls(
            faults=values.get("faults"),
            max_requests=int(values.get("max_requests", 20_000)),
        )


def api_key_sha256(token: str) -> str:
    """The only form in which a customer's API key leaves the stub."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _reject_constant(name: str) -> Any:
    # json.loads would accept NaN/Infinity, which are not JSON; a partner would refuse them.
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return _NOT_JSON
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


def _fingerprint(body: Any) -> str:
    if body is _NOT_JSON:
        body = None
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def _audience_id_out(audience_id: str) -> int | str:
    # mParticle audience ids are integers; echo them back as such so a client can
    # compare with what it sent, but do not reject non-numeric ids.
    return int(audience_id) if audience_id.isdigit() else audience_id


def create_stub_app(config: StubConfig | Mapping[str, Any] | None = None) -> Flask:
    """Build the stub's Flask app with fresh in-memory state."""
    if config is None:
        config = StubConfig()
    elif not isinstance(config, StubConfig):
        config = StubConfig.from_mapping(config)

    state = StubState(max_requests=config.max_requests)
    # Compile the contract's schemas now: a broken schema file fails the start, not the first request.
    load_validators()
    # Bad rules at startup must fail loudly, not leave a stub without its faults.
    state.set_rules(parse_rules(config.faults))

    app = Flask("partner_stub")
    # Keep keys in insertion order so the request log reads like what was sent.
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["partner_stub_state"] = state

    # --- cross-cutting handling of /v1 -------------------------------------

    @app.before_request
    def _before_v1() -> Response | None:
        path = request.path
        if not (path == "/v1" or path.startswith("/v1/")):
            return None
        token = _bearer_token(request.headers.get("Authorization"))
        key_sha = api_key_sha256(token) if token else None
        body = _parse_json(request.get_data(cache=True))
        g.body = body
        g.key_sha = key_sha
        g.entry = state.record(
            request.method,
            path,
            request.headers.get("Idempotency-Key"),
            key_sha,
            None if body is _NOT_JSON else body,
        )

        # Faults come first: they model a load balancer or an overloaded partner,
        # which answer before any authentication or validation happens.
        rule = state.pick_fault(request.method, path, key_sha)
        if rule is not None:
            if rule.latency_ms:
                time.sleep(rule.latency_ms / 1000.0)
            if rule.status is not None:
                g.entry["fault"] = True
                logger.info("injected fault %s on %s %s", rule.status, request.method, path)
                return _fault_response(rule)

        if token is None:
            return _error(401, "missing or empty bearer token", {"WWW-Authenticate": "Bearer"})
        return None

    @app.after_request
    def _after(response: Response) -> Response:
        entry = g.get("entry")
        if entry is not None:
            # When the answer left, not when the request came in: an injected latency lies between,
            # and a test judging what the relay did after an answer needs the answer's time.
            entry["answered_at"] = time.time()
            entry["status"] = response.status_code
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # Log the frames and the exception type but not its message: messages
        # can quote payload content, and payloads are customers' data.
        logger.error(
            "unhandled %s on %s %s\n%s",
            type(exc).__name__,
            request.method,
            request.path,
            "".join(traceback.format_tb(exc.__traceback__)),
        )
        return _error(500, "internal stub error")

    def _json_body() -> Any:
        if not request.is_json:
            raise PayloadError("Content-Type must be application/json")
        if g.body is _NOT_JSON:
            raise PayloadError("body is not valid JSON")
        return g.body

    def _idempotent(apply: Callable[[], tuple[int, dict[str, Any]]]) -> Response:
        """Answer a repeat from memory, otherwise apply and remember a 2xx answer."""
        idem_key = request.headers.get("Idempotency-Key")
        # Scoped by customer and route: a key only has to be unique for one
        # customer's payloads on one endpoint.
        scope = (g.key_sha, request.method, request.path, idem_key) if idem_key else None
        fingerprint = _fingerprint(g.body) if scope else ""
        with state.lock:
            if scope is not None:
                stored = state.seen(scope, fingerprint)
                if stored is not None:
                    g.entry["duplicate"] = True
                    return _json(stored.status, stored.payload)
            status, payload = apply()
            if scope is not None:
                state.remember(scope, StoredResponse(status, payload, fingerprint))
        return _json(status, payload)

    @app.errorhandler(PayloadError)
    def _payload_error(exc: PayloadError) -> Response:
        return _error(400, str(exc))

    # --- the partner API -------------------------------------------------------

    @app.post("/v1/events")
    def post_events() -> Response:
        batches = validate_events(_json_body())
        return _idempotent(lambda: (202, {"accepted_events": state.apply_events(g.key_sha, batches)}))

    @app.put("/v1/audiences/<audience_id>")
    def put_audience(audience_id: str) -> Response:
        body = validate_audience(_json_body())

        def apply() -> tuple[int, dict[str, Any]]:
            state.put_audience(g.key_sha, audience_id, body)
            return 200, {"audience_id": _audience_id_out(audience_id)}

        return _idempotent(apply)

    @app.delete("/v1/audiences/<audience_id>")
    def delete_audience(audience_id: str) -> Response:
        # A body is optional here (the audience as mParticle describes it), so no Content-Type
        # requirement; a body that is there must follow the contract like PUT's.
        body = validate_audience_delete(None if g.body is _NOT_JSON else g.body)

        def apply() -> tuple[int, dict[str, Any]]:
            state.delete_audience(g.key_sha, audience_id, body)
            return 200, {"audience_id": _audience_id_out(audience_id), "deleted": True}

        return _idempotent(apply)

    @app.post("/v1/audiences/<audience_id>/members")
    def post_members(audience_id: str) -> Response:
        body = _json_body()
        changes = validate_member_changes(body)
        account_id = body.get("account_id")
        described = body.get("audience")
        return _idempotent(
            lambda: (
                200,
                {"applied": state.apply_member_changes(g.key_sha, audience_id, account_id, changes, described)},
            )
        )

    @app.delete("/v1/users")
    def delete_users() -> Response:
        body = validate_erasure(_json_body())

        def apply() -> tuple[int, dict[str, Any]]:
            state.erase(g.key_sha, body)
            return 202, {"request_id": body.get("request_id")}

        return _idempotent(apply)

    # --- stub-only admin routes -------------------------------------------------

    @app.get("/_stub/health")
    def stub_health() -> Response:
        return jsonify({"ok": True})

    @app.get("/_stub/requests")
    def stub_requests() -> Response:
        path_prefix = request.args.get("path_prefix") or None
        try:
            after_seq = int(request.args.get("after_seq", "0"))
        except ValueError:
            return _error(400, "after_seq must be an integer")
        return jsonify({"requests": state.list_requests(path_prefix, after_seq)})

    @app.get("/_stub/state")
    def stub_state() -> Response:
        return jsonify(state.view())

    @app.get("/_stub/faults")
    def stub_get_faults() -> Response:
        return jsonify({"rules": state.rules_view()})

    @app.post("/_stub/faults")
    def stub_set_faults() -> Response:
        body = _parse_json(request.get_data())
        if body is _NOT_JSON:
            return _error(400, "body is not valid JSON")
        try:
            rules = parse_rules(body)
        except FaultConfigError as exc:
            return _error(400, str(exc))
        state.set_rules(rules)
        return jsonify({"rules": state.rules_view()})

    @app.post("/_stub/reset")
    def stub_reset() -> Response:
        with state.lock:
            state.clear()
        return jsonify({"reset": True})

    return app


def _json(status: int, payload: dict[str, Any]) -> Response:
    response = jsonify(payload)
    response.status_code = status
    return response


def _fault_response(rule: FaultRule) -> Response:
    response = _json(rule.status or 503, {"error": "injected fault", "status": rule.status})
    if rule.retry_after is not None:
        response.headers["Retry-After"] = rule.retry_after
    return response


def get_state(app: Flask) -> StubState:
    """The state behind an app built by create_stub_app (for in-process tests)."""
    return app.extensions["partner_stub_state"]
