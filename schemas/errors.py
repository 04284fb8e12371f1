"""The one error shape every error answer uses."""

from __future__ import annotations

from marshmallow import Schema, fields


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"description": "Stable machine-readable code."})
    message = fields.String(required=True)
    fields = fields.Dict(
        keys=fields.String(),
        metadata={"description": "Per-field validation messages, when the input was invalid."},
    )


class ErrorSchema(Schema):
    error = fields.Nested(ErrorBodySchema, required=True)


def error_body(code: str, message: str, field_errors: dict | None = None) -> dict:
    body: dict = {"code": code, "message": message}
    if field_errors:
        body["fields"] = field_errors
    return {"error": body}
