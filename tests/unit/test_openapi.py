"""GET /openapi.json: a valid OpenAPI 3 document that lists every route the app serves."""

from __future__ import annotations

import re
import warnings
from typing import Any

import orjson
import pytest
from flask import Flask
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from common.config import Settings
from schemas.messages import REQUEST_TYPES, RESPONSES
from service import create_app
from service.openapi import build_spec
from tests.support import SAMPLES, extra_corpus, sample

IGNORED_METHODS = {"HEAD", "OPTIONS"}


@pytest.fixture(scope="module")
def app(redis_url: str) -> Flask:
    return create_app(Settings(redis_url=redis_url, broker_url=redis_url))


@pytest.fixture(scope="module")
def document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def test_the_document_is_valid_openapi_3(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.")
    validate(document)


def test_building_it_warns_of_nothing(app: Flask) -> None:
    # apispec warns when two schemas resolve to one component name, one hiding the other.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_spec(app)


def _shape(path: str) -> str:
    """A path with its parameter names blanked: `/firehose/<path:_anything>` ~ `/firehose/{anything}`."""
    return re.sub(r"\{[^}]*\}", "{}", re.sub(r"<[^>]*>", "{}", path))


def test_every_route_is_documented(app: Flask, document: dict[str, Any]) -> None:
    documented = {_shape(path): operations for path, operations in document["paths"].items()}
    rules = [rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"]
    expected = {"/firehose", "/firehose/{}", "/healthz", "/readyz", "/metrics", "/openapi.json"}
    assert expected <= {_shape(rule.rule) for rule in rules}
    for rule in rules:
        operations = documented.get(_shape(rule.rule))
        assert operations is not None, f"{rule.rule} is not in the document"
        for method in (rule.methods or set()) - IGNORED_METHODS:
            operation = operations.get(method.lower())
            assert operation is not None, f"{method} {rule.rule} is not in the document"
            assert not operation.get("x-undocumented"), f"{method} {rule.rule} has no description in OPERATIONS"
            assert operation["responses"], f"{method} {rule.rule} documents no answer"


def test_path_parameters_are_declared(document: dict[str, Any]) -> None:
    [subpath] = [path for path in document["paths"] if path.startswith("/firehose/")]
    [parameter] = document["paths"][subpath]["parameters"]
    assert parameter["in"] == "path" and parameter["required"] is True
    assert "{" + parameter["name"] + "}" in subpath


def test_firehose_bodies_cover_every_message_type(document: dict[str, Any]) -> None:
    operation = document["paths"]["/firehose"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["discriminator"]["mapping"]) == REQUEST_TYPES
    schemas = document["components"]["schemas"]
    for kind, ref in body["discriminator"]["mapping"].items():
        schema = schemas[ref.rsplit("/", 1)[1]]
        assert schema["properties"]["type"]["enum"] == [kind]
        assert "type" in schema["required"]
    # Each answer's type is in the document, with the status the protocol gives it.
    for response_type, status in RESPONSES.values():
        content = operation["responses"][str(status)]["content"]["application/json"]["schema"]
        refs = [option["$ref"] for option in content.get("oneOf", [content])]
        assert any(ref.endswith("/" + "".join(p.title() for p in response_type.split("_"))) for ref in refs)


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        *_, kind, name = node["$ref"].split("/")
        node = document["components"][kind][name]
    return node


def test_errors_have_the_one_error_shape(document: dict[str, Any]) -> None:
    responses = document["paths"]["/firehose"]["post"]["responses"]
    for status in ("400", "401", "413", "503"):
        response = _resolve(document, responses[status])
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, status
    unavailable = _resolve(document, responses["503"])
    assert "Retry-After" in unavailable["headers"]
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    body = _resolve(document, error["properties"]["error"])
    assert set(body["required"]) == {"code", "message"}


def _validator(document: dict[str, Any], component: str) -> OAS30Validator:
    # Resolve $refs against the whole document.
    schema = {**document["components"]["schemas"][component], "components": document["components"]}
    return OAS30Validator(schema)


# The fixtures always, the shared SDK corpus's samples too when this machine has it.
CORPORA = {"fixtures": SAMPLES, **({"shared": corpus} if (corpus := extra_corpus()) else {})}


@pytest.mark.parametrize("corpus", list(CORPORA))
@pytest.mark.parametrize(
    ("name", "component"),
    [
        ("ModuleRegistrationRequest.json", "ModuleRegistrationRequest"),
        ("EventProcessingRequest_ios.json", "EventProcessingRequest"),
        ("EventProcessingRequest_android.json", "EventProcessingRequest"),
        ("AudienceSubscriptionRequest.json", "AudienceSubscriptionRequest"),
        ("AudienceMembershipChangeRequest.json", "AudienceMembershipChangeRequest"),
        ("DsrProcessingRequest.json", "DsrProcessingRequest"),
    ],
)
def test_the_samples_match_their_documented_schema(
    document: dict[str, Any], corpus: str, name: str, component: str
) -> None:
    message = orjson.loads((CORPORA[corpus] / "3.2.0" / name).read_bytes())
    errors = [error.message for error in _validator(document, component).iter_errors(message)]
    assert errors == []


def test_real_answers_match_their_documented_schema(app: Flask, document: dict[str, Any]) -> None:
    client = app.test_client()
    registration = client.post("/firehose", data=sample("3.2.0", "ModuleRegistrationRequest.json")).get_json()
    assert list(_validator(document, "ModuleRegistrationResponse").iter_errors(registration)) == []
    error = client.post("/firehose", data=b"{").get_json()
    assert list(_validator(document, "Error").iter_errors(error)) == []
