"""Where sample Firehose messages come from: the project's own fixtures, always, and the SDK's
sample corpus as an extra when this machine has it.

The fixtures (tests/fixtures/messages/<version>/<File>.json, written by devtools/make_fixtures.py)
are what every test and the benchmark rely on, so a fresh clone needs nothing beside it. The
shared corpus (FIREHOSE_SAMPLES_DIR, else ../shared/firehose-samples) only adds cases.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "messages"
SHARED_ENV = "FIREHOSE_SAMPLES_DIR"
DEFAULT_SHARED = ROOT.parent / "shared" / "firehose-samples"


def shared_corpus() -> Path | None:
    """The SDK's sample corpus if there is one: `FIREHOSE_SAMPLES_DIR` when set, else
    ../shared/firehose-samples beside the checkout; None when neither is there."""
    configured = os.environ.get(SHARED_ENV, "").strip()
    if configured:
        path = Path(configured)
        if not path.is_dir():
            # Set on purpose but wrong: silently running without it would hide the mistake.
            raise FileNotFoundError(f"{SHARED_ENV}={configured} is not a directory")
        return path
    return DEFAULT_SHARED if DEFAULT_SHARED.is_dir() else None


def message_files(root: Path) -> list[Path]:
    """The message files of one corpus: <version>/<File>.json (schema/ folders are not messages)."""
    return sorted(path for path in root.glob("*/*.json") if path.is_file())


def fixture_files() -> list[Path]:
    return message_files(FIXTURES)


def shared_files() -> list[Path]:
    corpus = shared_corpus()
    return message_files(corpus) if corpus else []


def all_files() -> list[Path]:
    """Every fixture, then every shared sample when the shared corpus is present."""
    return fixture_files() + shared_files()


def label(path: Path) -> str:
    """A short, unique name for a sample file: `fixtures/3.2.0/X.json` or `shared/3.2.0/X.json`."""
    if path.is_relative_to(FIXTURES):
        return f"fixtures/{path.relative_to(FIXTURES)}"
    corpus = shared_corpus()
    if corpus and path.is_relative_to(corpus):
        return f"shared/{path.relative_to(corpus)}"
    return str(path)


def fixture(version: str, name: str) -> Path:
    return FIXTURES / version / name


# ------------------------------------------------------------------- the SDK's JSON Schemas


def _with_ids(node: Any) -> list[dict[str, Any]]:
    """Every (nested) schema object that carries a urn id, so $refs between files resolve."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("id"), str) and node["id"].startswith("urn:"):
            found.append(node)
        for value in node.values():
            found.extend(_with_ids(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_with_ids(value))
    return found


def sdk_schema_validators(schema_dir: Path) -> dict[str, Any]:
    """A draft-3 validator per `<Name>_schema.json` in `schema_dir` (protocol §16), by Name."""
    from jsonschema import Draft3Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT3

    documents = {
        path.name.removesuffix("_schema.json"): json.loads(path.read_text())
        for path in schema_dir.glob("*_schema.json")
    }
    registry = Registry()
    for document in documents.values():
        for schema in _with_ids(document):
            registry = registry.with_resource(schema["id"], Resource(contents=schema, specification=DRAFT3))
    return {name: Draft3Validator(document, registry=registry) for name, document in documents.items()}
