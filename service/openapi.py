"""The OpenAPI 3 document of the service, generated from the marshmallow schemas with apispec.

Paths come from the app's own URL map, so a route cannot be served without being listed:
a route with no entry in OPERATIONS still appears, marked `x-undocumented`, and the test
(tests/unit/test_openapi.py) fails on that mark. Request and response bodies are the wire
schemas of `schemas/`; the few classes below only add what documentation needs and
validation does not (a `type` enum per message, so a reader can tell the bodies apart).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, Response, current_app
from marshmallow import Schema, fields, validate
from werkzeug.routing import Rule

from schemas.audiences import AudienceSchema, MembershipSchema, ProfileSchema, SubscriptionSchema
from schemas.dsr import DsrSchema
from schemas.errors import ErrorSchema
from schemas.events import EVENT_TYPES, EventBatchSchema, EventSchema
from schemas.fields import (
    IdentitySchema,
    IdString,
    LenientSchema,
    SettingsMap,
    SettingValue,
    StrictBool,
    StrictInt,
    StrictNumber,
    StringList,
    UUIDString,
)
from schemas.messages import (
    DSR,
    DSR_RESPONSE,
    EVENTS,
    EVENTS_RESPONSE,
    FIREHOSE_VERSION,
    MEMBERSHIP,
    MEMBERSHIP_RESPONSE,
    REGISTRATION,
    REGISTRATION_RESPONSE,
    RESPONSES,
    SUBSCRIPTION,
    SUBSCRIPTION_RESPONSE,
)
from schemas.responses import (
    AudienceMembershipChangeResponseSchema,
    AudienceSubscriptionResponseSchema,
    DsrProcessingResponseSchema,
    EventProcessingResponseSchema,
    ResponseEnvelopeSchema,
)
from service.errors import json_response

# The version of this HTTP API's description, not of the Firehose protocol (FIREHOSE_VERSION).
API_VERSION = "1.0.0"
OPENAPI_VERSION = "3.0.3"


def _kind(name: str, what: str) -> fields.String:
    return fields.String(required=True, validate=validate.OneOf([name]), metadata={"description": what})


def _identities(what: str) -> fields.List:
    return fields.List(fields.Nested(IdentitySchema), allow_none=True, metadata={"description": what})


# ------------------------------------------------------------------ request bodies


class ModuleRegistrationRequestSchema(LenientSchema):
    type = _kind(REGISTRATION, "Asks for the integration's description; needs no token.")
    id = UUIDString()
    timestamp_ms = StrictInt()
    firehose_version = SettingValue()


class EventDocSchema(EventSchema):
    type = fields.String(
        required=True,
        validate=validate.OneOf(sorted(EVENT_TYPES)),
        metadata={
            "description": "Each type has fields of its own; an invalid or unknown event is skipped "
            "(counted by reason) and the rest of the batch is delivered."
        },
    )


class EventProcessingRequestSchema(EventBatchSchema):
    type = _kind(EVENTS, "A batch of one user's events. Answered 202 once stored; no events = verification.")
    user_identities = _identities("The user's identities, as permitted by the registration.")
    partner_identities = _identities("Identities the partner supplied.")
    events = fields.List(fields.Nested(EventDocSchema), allow_none=True)


class AudienceSubscriptionRequestSchema(SubscriptionSchema):
    type = _kind(SUBSCRIPTION, "An audience was connected (add), reconfigured (update) or disconnected (remove).")


class AudienceMembershipDocSchema(AudienceSchema):
    action = fields.String(validate=validate.OneOf(["add", "delete", "attribute_update"]))
    user_attributes = fields.List(fields.Dict(), allow_none=True)


class UserProfileDocSchema(ProfileSchema):
    user_identities = _identities("The user's identities.")
    device_identities = _identities("The user's device identities.")
    partner_identities = _identities("Identities the partner supplied.")
    audiences = fields.List(fields.Nested(AudienceMembershipDocSchema), allow_none=True)
    added_audiences = fields.List(fields.Nested(AudienceSchema), allow_none=True, metadata={"description": "1.x"})
    removed_audiences = fields.List(fields.Nested(AudienceSchema), allow_none=True, metadata={"description": "1.x"})


class AudienceMembershipChangeRequestSchema(MembershipSchema):
    type = _kind(MEMBERSHIP, "Users joined or left audiences. No user_profiles = verification.")
    user_profiles = fields.List(fields.Nested(UserProfileDocSchema), allow_none=True)


class DsrProcessingRequestSchema(DsrSchema):
    type = _kind(DSR, "A data subject request (OpenDSR); erasures are delivered as DELETE /v1/users.")
    subject_identities = fields.Dict(allow_none=True)


REQUEST_SCHEMAS: dict[str, type[Schema]] = {
    REGISTRATION: ModuleRegistrationRequestSchema,
    EVENTS: EventProcessingRequestSchema,
    SUBSCRIPTION: AudienceSubscriptionRequestSchema,
    MEMBERSHIP: AudienceMembershipChangeRequestSchema,
    DSR: DsrProcessingRequestSchema,
}

# ----------------------------------------------------------------- response bodies


class ModuleRegistrationResponseSchema(ResponseEnvelopeSchema):
    type = _kind(REGISTRATION_RESPONSE, "The integration's description (REGISTRATION_* settings).")
    sdk_version = fields.String()
    name = fields.String()
    version = fields.String()
    description = fields.String()
    permissions = fields.Dict()
    event_processing_registration = fields.Dict()
    audience_processing_registration = fields.Dict()
    dsr_processing_registration = fields.Dict()


def _typed_response(base: type[Schema], kind: str) -> type[Schema]:
    return type(f"{kind.title().replace('_', '')}Schema", (base,), {"type": _kind(kind, "The response type.")})


RESPONSE_SCHEMAS: dict[str, type[Schema]] = {
    REGISTRATION_RESPONSE: ModuleRegistrationResponseSchema,
    EVENTS_RESPONSE: _typed_response(EventProcessingResponseSchema, EVENTS_RESPONSE),
    SUBSCRIPTION_RESPONSE: _typed_response(AudienceSubscriptionResponseSchema, SUBSCRIPTION_RESPONSE),
    MEMBERSHIP_RESPONSE: _typed_response(AudienceMembershipChangeResponseSchema, MEMBERSHIP_RESPONSE),
    DSR_RESPONSE: _typed_response(DsrProcessingResponseSchema, DSR_RESPONSE),
}


def _component_name(kind: str) -> str:
    return "".join(part.title() for part in kind.split("_"))


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


# ----------------------------------------------------------------------- operations

_REQUEST_ID = {
    "description": "The request id: the caller's `X-Request-Id` when it was sane, else a new one. "
    "Every log line about the request carries it.",
    "schema": {"type": "string"},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _answer(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": _ref("headers", "RequestId"), **(headers or {})},
        "content": _json(schema),
    }


def _error(description: str) -> dict[str, Any]:
    return _answer(description, _ref("schemas", "Error"))


_SUBPATH_NOTE = " mParticle setups with one URL per message type post here; the path is ignored."


def _firehose(rule: Rule, _method: str) -> dict[str, Any]:
    success = [_ref("schemas", _component_name(response)) for response, status in RESPONSES.values() if status == 200]
    operation: dict[str, Any] = {
        "tags": ["firehose"],
        "summary": "Receive a Firehose message" + (" (any sub-path)" if rule.arguments else ""),
        "description": (
            "Dispatches on the body's `type`. Every message but registration needs "
            "`Authorization: Token <token>` when FIREHOSE_AUTH_TOKEN is set. A message with work is "
            "stored durably before the answer; a message id seen within DEDUP_TTL_SECONDS is answered "
            "again and not queued twice." + (_SUBPATH_NOTE if rule.arguments else "")
        ),
        "security": [{"FirehoseToken": []}, {}],
        "requestBody": {
            "required": True,
            "content": _json(
                {
                    "oneOf": [_ref("schemas", _component_name(kind)) for kind in REQUEST_SCHEMAS],
                    "discriminator": {
                        "propertyName": "type",
                        "mapping": {kind: f"#/components/schemas/{_component_name(kind)}" for kind in REQUEST_SCHEMAS},
                    },
                }
            ),
        },
        "responses": {
            "200": _answer("Registration, audience and DSR answers.", {"oneOf": success}),
            "202": _answer(
                "An event batch was stored (or was verification traffic, or a repeat).",
                _ref("schemas", _component_name(EVENTS_RESPONSE)),
            ),
            "400": _ref("responses", "BadRequest"),
            "401": _ref("responses", "Unauthorized"),
            "408": _ref("responses", "RequestTimeout"),
            "413": _ref("responses", "PayloadTooLarge"),
            "500": _ref("responses", "InternalError"),
            "503": _ref("responses", "Unavailable"),
        },
    }
    if rule.arguments:
        operation["responses"]["404"] = _ref("responses", "NotFound")
    operation["operationId"] = "receiveFirehoseSubpath" if rule.arguments else "receiveFirehose"
    return operation


def _healthz(_rule: Rule, _method: str) -> dict[str, Any]:
    return {
        "tags": ["operations"],
        "operationId": "healthz",
        "summary": "Liveness: the process answers (says nothing of Redis).",
        "responses": {"200": _answer("Alive.", _ref("schemas", "Status"))},
    }


def _readyz(_rule: Rule, _method: str) -> dict[str, Any]:
    return {
        "tags": ["operations"],
        "operationId": "readyz",
        "summary": "Readiness: Redis answers within the ingest budget.",
        "responses": {"200": _answer("Ready.", _ref("schemas", "Status")), "503": _ref("responses", "Unavailable")},
    }


def _metrics(_rule: Rule, _method: str) -> dict[str, Any]:
    return {
        "tags": ["operations"],
        "operationId": "metrics",
        "summary": "Prometheus metrics: requests, latency, ingest outcomes, queues, delivery counters.",
        "description": "Web counters summed over every gunicorn worker, and what every worker keeps in "
        "Redis, read at scrape time. A Redis outage is reported as `firehose_redis_up 0`, not an error.",
        "responses": {
            "200": {
                "description": "Prometheus text exposition format.",
                "headers": {"X-Request-Id": _ref("headers", "RequestId")},
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    }


def _openapi(_rule: Rule, _method: str) -> dict[str, Any]:
    return {
        "tags": ["operations"],
        "operationId": "openapi",
        "summary": "This document.",
        "responses": {"200": _answer("An OpenAPI 3 document.", {"type": "object"})},
    }


def _cookie_sync(_rule: Rule, _method: str) -> dict[str, Any]:
    return {
        "tags": ["firehose"],
        "operationId": "cookieSync",
        "summary": "mParticle's cookie-sync pixel: sends the browser back with the partner's id filled in.",
        "parameters": [
            {
                "name": "redirect",
                "in": "query",
                "required": True,
                "description": "mParticle's redirect URL: https, on a host in COOKIE_SYNC_ALLOWED_HOSTS. "
                "The partner id replaces COOKIE_SYNC_MACRO in it (or is appended as partner_id).",
                "schema": {"type": "string"},
            }
        ],
        "description": "Every other query parameter is echoed to the redirect URL. The partner's "
        "first-party id cookie (COOKIE_SYNC_COOKIE) is read, or set when missing or malformed.",
        "responses": {
            "302": {
                "description": "Back to mParticle.",
                "headers": {
                    "X-Request-Id": _ref("headers", "RequestId"),
                    "Location": {"description": "The filled-in redirect URL.", "schema": {"type": "string"}},
                    "Set-Cookie": {"description": "The partner id cookie, when new.", "schema": {"type": "string"}},
                },
            },
            "400": _error("`invalid_redirect` or `redirect_not_allowed`: no open redirects."),
        },
    }


# Flask endpoint -> the operation of each of its rules.
OPERATIONS: dict[str, Callable[[Rule, str], dict[str, Any]]] = {
    "firehose.receive": _firehose,
    "cookie_sync.cookie_sync": _cookie_sync,
    "health.healthz": _healthz,
    "health.readyz": _readyz,
    "metrics.metrics": _metrics,
    "openapi.openapi_json": _openapi,
}
_IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})
_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def openapi_path(rule: str) -> str:
    """`/firehose/<path:_anything>` -> `/firehose/{anything}`."""
    return _RULE_ARGUMENT.sub(lambda m: "{" + m.group(1).lstrip("_") + "}", rule)


def _undocumented(rule: Rule, method: str) -> dict[str, Any]:
    return {
        "summary": f"Undocumented: {rule.endpoint}",
        "operationId": f"undocumented_{rule.endpoint}_{method}".replace(".", "_"),
        "x-undocumented": True,
        "responses": {"default": {"description": "Not documented."}},
    }


def _path_parameters(rule: Rule) -> list[dict[str, Any]]:
    return [
        {
            "name": name.lstrip("_"),
            "in": "path",
            "required": True,
            "description": "Any sub-path, slashes included; ignored.",
            "schema": {"type": "string"},
        }
        for name in sorted(rule.arguments)
    ]


def _components(spec: APISpec) -> None:
    spec.components.schema("Error", schema=ErrorSchema)
    for kind, schema in REQUEST_SCHEMAS.items():
        spec.components.schema(_component_name(kind), schema=schema)
    for kind, schema in RESPONSE_SCHEMAS.items():
        spec.components.schema(_component_name(kind), schema=schema)
    spec.components.schema(
        "Status", {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    )
    spec.components.header("RequestId", _REQUEST_ID)
    spec.components.header(
        "RetryAfter", {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
    )
    spec.components.response(
        "BadRequest",
        _error(
            "`invalid_json`, `invalid_envelope` (with `fields`), `unknown_type`, `unsupported_type` "
            "(a response type sent as a request) or `invalid_body` (a body that could not be read)."
        ),
    )
    spec.components.response("Unauthorized", _error("`unauthorized`: the token is missing or wrong."))
    spec.components.response(
        "PayloadTooLarge",
        _error(
            "`payload_too_large`: the body is over MAX_BODY_BYTES (UNAUTHENTICATED_MAX_BODY_BYTES without a token)."
        ),
    )
    spec.components.response(
        "RequestTimeout", _error("`request_timeout`: the client stopped sending the body; mParticle retries a 408.")
    )
    spec.components.response("NotFound", _error("`not_found`: a sub-path that does not route (e.g. `..`)."))
    spec.components.response("InternalError", _error("`internal_error`: a fault of ours; retry later."))
    spec.components.response(
        "Unavailable",
        _answer(
            "`unavailable`: Redis did not answer in time; retry after Retry-After.",
            _ref("schemas", "Error"),
            {"Retry-After": _ref("headers", "RetryAfter")},
        ),
    )
    spec.components.security_scheme(
        "FirehoseToken",
        {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Token <token>`, one of FIREHOSE_AUTH_TOKEN's comma-separated tokens. "
            "Registration needs none.",
        },
    )


def _schema_name(schema: type[Schema] | Schema) -> str:
    """Component names for nested schemas: `EventDocSchema` -> `Event`, `_DsrAccountSchema` -> `DsrAccount`."""
    cls = schema if isinstance(schema, type) else type(schema)
    return cls.__name__.removesuffix("Schema").removesuffix("Doc").lstrip("_")


def _map_fields(plugin: MarshmallowPlugin) -> None:
    # Our strict fields subclass Field, not the marshmallow type they check: say what they hold.
    plugin.map_to_openapi_type(UUIDString, "string", "uuid")
    plugin.map_to_openapi_type(StrictNumber, "number", None)
    plugin.map_to_openapi_type(StrictBool, "boolean", None)
    plugin.map_to_openapi_type(IdString, "string", None)
    plugin.map_to_openapi_type(SettingValue, "string", None)
    plugin.map_to_openapi_type(StringList, "array", None)
    plugin.map_to_openapi_type(SettingsMap, "object", None)


def build_spec(app: Flask) -> dict[str, Any]:
    """The document for `app`'s routes, as a dict."""
    plugin = MarshmallowPlugin(schema_name_resolver=_schema_name)
    spec = APISpec(
        title="Firehose Relay",
        version=API_VERSION,
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={
            "description": "The partner side of mParticle's Firehose protocol "
            f"(messages up to firehose_version {FIREHOSE_VERSION}). Every error answer has one shape: "
            '`{"error": {"code", "message", "fields"?}}`.'
        },
        tags=[
            {"name": "firehose", "description": "What mParticle calls."},
            {"name": "operations", "description": "What load balancers, orchestrators and Prometheus call."},
        ],
    )
    _map_fields(plugin)
    _components(spec)
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        describe = OPERATIONS.get(rule.endpoint, _undocumented)
        operations = {
            method.lower(): describe(rule, method) for method in sorted((rule.methods or set()) - _IGNORED_METHODS)
        }
        spec.path(path=openapi_path(rule.rule), operations=operations, parameters=_path_parameters(rule))
    return spec.to_dict()


bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    document = current_app.extensions.get("openapi_document")
    if document is None:
        # Built at the first request, when every blueprint is registered; the routes do not
        # change after that.
        document = current_app.extensions["openapi_document"] = build_spec(current_app)
    return json_response(document, 200)
