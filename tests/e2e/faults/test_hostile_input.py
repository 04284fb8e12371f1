"""Hostile input: property-based and mutation fuzzing of every message type, schemathesis
against the running service's /openapi.json, malformed and oversize bodies, bad tokens and
slow clients. The bulk runs through Flask's test client on the real Redis (database 6); a
smaller set goes through gunicorn of the fault stack, whose workers then deliver or
dead-letter whatever was accepted.

The property: no 5xx; every error in `{"error": {"code", "message", "fields"?}}`; an answer
the input deserves (invalid JSON -> 400 invalid_json, no token -> 401, never 2xx for a body
that is not JSON); and the service healthy afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_lib
import requests
import schemathesis
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from common import dead_letters
from common.config import Settings
from common.keys import Keys
from devtools.faults import (
    SAMPLES,
    Results,
    SlowClient,
    Tally,
    error_shape_problem,
    fresh_message,
    new_secret,
    post,
    raw_request,
    read_answer,
    request_head,
    sha,
)
from schemas.messages import REGISTRATION, RESPONSES
from service import create_app
from tests.support import FUZZ_DB, Stub, every_sample, redis_db, wait_for
from tests.support.stack import Stack

KEYS = Keys("fr")
# One seed for the run, printed with any failure: FUZZ_SEED=... reproduces it.
# CI gates on a fixed seed (reproducible); elsewhere every run explores new inputs.
FUZZ_SEED = int(
    os.environ.get("FUZZ_SEED") or (20261124 if os.environ.get("CI") else random.SystemRandom().randrange(2**32))
)
MAX_BODY = Settings().max_body_bytes


def _parsed(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        return None  # a sample that is not JSON itself: sent as it is, below


# The fixtures, plus the shared SDK corpus when this machine has it.
_ALL_SAMPLES = every_sample()
_PARSED = {p: doc for p in _ALL_SAMPLES if (doc := _parsed(p)) is not None}
SAMPLE_FILES = sorted(_PARSED)
UNPARSEABLE_SAMPLES = [p.read_bytes() for p in _ALL_SAMPLES if p not in _PARSED]
TYPES = sorted({doc.get("type") for doc in _PARSED.values() if isinstance(doc, dict)})

# ------------------------------------------------------------------ hostile JSON text


@dataclasses.dataclass(frozen=True)
class Raw:
    """JSON text written as is: what no serializer would write (NaN, 2**64, bad UTF-8, depth)."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class Twice:
    """A key written twice in one object, with two values."""

    first: Any
    second: Any


def encode(value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, bytes):  # a special drawn bare: JSON text as is, like Raw
        return value
    if isinstance(value, Twice):  # a doubled key moved out of its object by a later mutation
        return encode(value.second)
    if isinstance(value, dict):
        parts = []
        for key, item in value.items():
            name = orjson.dumps(key)
            if isinstance(item, Twice):
                parts += [name + b":" + encode(item.first), name + b":" + encode(item.second)]
            else:
                parts.append(name + b":" + encode(item))
        return b"{" + b",".join(parts) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(encode(item) for item in value) + b"]"
    return orjson.dumps(value)


SPECIALS = [
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"1" + b"0" * 400,
    b"0.1e99999",
    b"-0",
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"0x10",
    b"True",
    b"undefined",
    b'"\xff\xfe"',
    b'"\xc3\x28"',
    b'"\xed\xa0\x80"',
    b'"\xf4\x90\x80\x80"',
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b'"\\u0000"',
    b'"a\x00b"',
    b'"\x1f"',
    b"'single'",
    b'"unterminated',
    b"[1,]",
    b'{"a":1,}',
    b"{,}",
    b"",
]
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
huge_ints = st.one_of(st.integers(2**64, 2**300), st.integers(-(2**300), -(2**63) - 1)).map(
    lambda n: Raw(str(n).encode())
)
deep = st.tuples(st.integers(1, 1200), st.sampled_from(["list", "dict"])).map(
    lambda d: Raw(b"[" * d[0] + b"]" * d[0]) if d[1] == "list" else Raw(b'{"a":' * d[0] + b"1" + b"}" * d[0])
)
replacements = st.one_of(
    json_values,
    st.sampled_from(SPECIALS).map(Raw),
    huge_ints,
    deep,
    st.sampled_from(TYPES),
    st.uuids().map(str),
    st.integers(0, 2**63 - 1),
)
# The envelope fields every message is checked for before it is stored, and some it is not.
ENVELOPE_PATHS = [
    ("type",),
    ("id",),
    ("timestamp_ms",),
    ("firehose_version",),
    ("account",),
    ("account", "account_id"),
    ("account", "account_settings"),
    ("account", "account_settings", "apiKey"),
    ("events",),
    ("user_profiles",),
    ("mpid",),
    ("source_channel",),
    ("subject_identities",),
]
MUTATIONS = ["drop", "retype", "twice", "add", "deep", "huge", "special", "wrap"]


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(len(node)))
    return []


@st.composite
def mutated_messages(draw: st.DrawFn) -> Any:
    """A sample (fixture or shared; any version, any type) with a new id and 1-4 mutations."""
    doc = copy.deepcopy(_PARSED[draw(st.sampled_from(SAMPLE_FILES))])
    if isinstance(doc, dict):
        doc["id"] = str(draw(st.uuids()))
    for _ in range(draw(st.integers(1, 4))):
        root = {"": doc}
        parent: Any = root
        key: Any = ""
        if isinstance(doc, dict) and draw(st.booleans()):
            path = draw(st.sampled_from(ENVELOPE_PATHS))
            for step in path:
                node = parent[key] if isinstance(parent, list) or key in parent else None
                if not isinstance(node, dict):
                    break
                parent, key = node, step
        else:
            for _ in range(draw(st.integers(0, 6))):
                node = parent[key] if isinstance(parent, list) or key in parent else None
                options = _children(node)
                if not options:
                    break
                parent, key = node, draw(st.sampled_from(options))
        operation = draw(st.sampled_from(MUTATIONS))
        exists = isinstance(parent, list) or key in parent
        if operation == "drop" and exists and parent is not root:
            del parent[key]
        elif operation == "twice" and isinstance(parent, dict) and parent is not root and exists:
            parent[key] = Twice(parent[key], draw(replacements))
        elif operation == "add" and exists and isinstance(parent[key], dict):
            parent[key][draw(text)] = draw(replacements)
        elif operation == "wrap" and exists:
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
        elif operation == "deep":
            parent[key] = draw(deep)
        elif operation == "huge":
            parent[key] = draw(huge_ints)
        elif operation == "special":
            parent[key] = Raw(draw(st.sampled_from(SPECIALS)))
        else:
            parent[key] = draw(replacements)
        doc = root[""]
    return doc


AUTH_MODES = {
    # mode: (header, authorized)
    "token": ("Token {token}", True),
    "token, lower-case scheme": ("token {token}", True),
    "token, padded": ("  Token   {token}  ", True),
    "missing": (None, False),
    "empty": ("", False),
    "wrong token": ("Token {wrong}", False),
    "bearer": ("Bearer {token}", False),
    "no scheme": ("{token}", False),
    "scheme only": ("Token", False),
    "token and junk": ("Token {token} junk", False),
    "basic": ("Basic {token}", False),
}
# Half the inputs carry the right token, so most reach validation.
auth_modes = st.one_of(st.just("token"), st.sampled_from(list(AUTH_MODES)))


def headers_for(mode: str, token: str, wrong: str) -> dict[str, str]:
    template, _ = AUTH_MODES[mode]
    return {} if template is None else {"Authorization": template.format(token=token, wrong=wrong)}


def expectation_problem(body: bytes, authorized: bool, status: int, content_type: str | None, raw: bytes) -> str | None:
    """Why this answer is wrong for this input, or None."""
    problem = error_shape_problem(status, content_type, raw)
    if problem:
        return problem
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        if len(body) > MAX_BODY:
            return None if status == 413 else f"oversize body answered {status}"
        if status != 400 or orjson.loads(raw)["error"]["code"] != "invalid_json":
            return f"a body that is not JSON answered {status} {raw[:100]!r}"
        return None
    kind = message.get("type") if isinstance(message, dict) else None
    if not authorized and kind != REGISTRATION:
        if status != 401:
            return f"no valid token, answered {status}"
        return None
    if 200 <= status < 300:
        answer = orjson.loads(raw)
        if not isinstance(kind, str) or kind not in RESPONSES or answer.get("type") != RESPONSES[kind][0]:
            return f"{status} for type {kind!r:.60} answered {answer!r:.100}"
        if status != RESPONSES[kind][1]:
            return f"{kind} answered {status}"
    return None


class Problems:
    """Distinct problems (by kind), each with the shortest input that showed it."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[str, bytes]] = {}

    def add(self, problem: str, body: bytes, auth: str) -> None:
        signature = problem.split(":")[0][:60]
        if signature not in self.found or len(body) < len(self.found[signature][1]):
            self.found[signature] = (f"{problem} [auth: {auth}]", body)

    def report(self) -> str:
        return "\n".join(f"- {what}\n  body: {body[:300]!r}" for what, body in self.found.values())


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fuzz_redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_db(FUZZ_DB))
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="module")
def client(fuzz_redis: redis_lib.Redis, fault_token: str) -> FlaskClient:
    url = redis_db(FUZZ_DB)
    return create_app(Settings(redis_url=url, broker_url=url, auth_tokens=(fault_token,))).test_client()


@pytest.fixture(scope="module")
def wrong_token(sent_secrets: dict[str, str]) -> str:
    token = new_secret("wrong")
    sent_secrets["wrong token"] = token
    return token


FUZZ_SETTINGS = {
    "deadline": 3000,
    "database": None,
    "suppress_health_check": list(HealthCheck),
    "derandomize": False,
    "print_blob": False,
}


Send = Callable[[bytes, dict[str, str]], tuple[int, str | None, bytes]]


def _run_fuzz(name: str, examples: int, send: Send, results: Results, token: str, wrong: str) -> None:
    tally, problems = Tally(), Problems()

    @seed(FUZZ_SEED)
    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(message=mutated_messages(), auth=auth_modes)
    def run(message: Any, auth: str) -> None:
        body = encode(message)
        status, content_type, raw = send(body, headers_for(auth, token, wrong))
        tally.add(status)
        problem = expectation_problem(body, AUTH_MODES[auth][1], status, content_type, raw)
        if problem:
            problems.add(problem, body, auth)

    try:
        run()
    finally:
        results.record_tally(
            name, tally, f"answers: {tally.summary()}; distinct problems: {len(problems.found)}; FUZZ_SEED={FUZZ_SEED}"
        )
    assert not problems.found, f"FUZZ_SEED={FUZZ_SEED}\n{problems.report()}"


# ------------------------------------------------------------- Flask test client


def test_mutated_samples_through_the_test_client(
    client: FlaskClient, fault_results: Results, fault_token: str, wrong_token: str
) -> None:
    def send(body: bytes, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
        response = client.post("/firehose", data=body, headers=headers)
        return response.status_code, response.content_type, response.data

    _run_fuzz(
        "Hypothesis: mutated shared samples, all types and versions (test client)",
        400,
        send,
        fault_results,
        fault_token,
        wrong_token,
    )


def test_arbitrary_bytes_and_json_through_the_test_client(
    client: FlaskClient, fault_results: Results, fault_token: str
) -> None:
    tally, problems = Tally(), Problems()

    @seed(FUZZ_SEED)
    @settings(max_examples=300, **FUZZ_SETTINGS)
    @given(
        body=st.one_of(
            st.binary(max_size=300),
            st.sampled_from(UNPARSEABLE_SAMPLES or [b"{"]),
            json_values.map(encode),
            st.dictionaries(st.sampled_from(["type", "id", "timestamp_ms", "account"]), json_values).map(encode),
            st.builds(
                lambda t, v: encode({"type": t, "id": str(uuid.uuid4()), "account": v}),
                st.sampled_from(TYPES),
                json_values,
            ),
        ),
        path=st.sampled_from(["/firehose", "/firehose/x", "/firehose/a/b%00c"]),
    )
    def run(body: bytes, path: str) -> None:
        response = client.post(path, data=body, headers={"Authorization": f"Token {fault_token}"})
        tally.add(response.status_code)
        problem = expectation_problem(body, True, response.status_code, response.content_type, response.data)
        if problem:
            problems.add(problem, body, "token")

    try:
        run()
    finally:
        fault_results.record_tally(
            "Hypothesis: arbitrary bytes and JSON values as the body (test client)",
            tally,
            f"answers: {tally.summary()}; FUZZ_SEED={FUZZ_SEED}",
        )
    assert not problems.found, f"FUZZ_SEED={FUZZ_SEED}\n{problems.report()}"


ENVELOPE_FIELDS = [
    "type",
    "id",
    "timestamp_ms",
    "firehose_version",
    "account",
    "account.account_id",
    "account.account_settings",
    "account.account_settings.apiKey",
    "events",
    "user_profiles",
]
WRONG_VALUES = {
    "null": None,
    "true": True,
    "integer": 7,
    "negative": -1,
    "float": 1.5,
    "string": "x",
    "empty string": "",
    "list": ["x"],
    "empty list": [],
    "object": {"x": 1},
    "empty object": {},
    "huge": Raw(b"18446744073709551616"),
    "NaN": Raw(b"NaN"),
}


def test_wrong_type_for_every_envelope_field(client: FlaskClient, fault_results: Results, fault_token: str) -> None:
    """Every envelope field of every message type, as every JSON type: 2xx or a 4xx in the error shape."""
    tally, problems = Tally(), Problems()
    for kind in [k for k in RESPONSES if not k.endswith("_response")]:
        base = (
            fresh_message(kind, "sample-key")
            if kind != REGISTRATION
            else orjson.loads((SAMPLES / "3.2.0" / "ModuleRegistrationRequest.json").read_bytes())
        )
        for field in ENVELOPE_FIELDS:
            for label, value in WRONG_VALUES.items():
                message = copy.deepcopy(base)
                message["id"] = str(uuid.uuid4()) if field != "id" else message.get("id")
                node = message
                *parents, last = field.split(".")
                for name in parents:
                    node = node.setdefault(name, {})
                    if not isinstance(node, dict):
                        break
                else:
                    node[last] = value
                body = encode(message)
                response = client.post("/firehose", data=body, headers={"Authorization": f"Token {fault_token}"})
                tally.add(response.status_code)
                problem = expectation_problem(body, True, response.status_code, response.content_type, response.data)
                if problem:
                    problems.add(f"{kind}.{field} as {label}: {problem}", body, "token")
    fault_results.record_tally(
        "Every envelope field of every type as every JSON type (test client)", tally, f"answers: {tally.summary()}"
    )
    assert not problems.found, problems.report()


def test_oversize_bodies_through_the_test_client(client: FlaskClient, fault_token: str) -> None:
    message = fresh_message("event_processing_request", "sample-key")
    padded = orjson.dumps(message)[:-1] + b', "pad": "' + b"x" * MAX_BODY + b'"}'
    auth = {"Authorization": f"Token {fault_token}"}
    for response in (
        client.post("/firehose", data=padded, headers=auth),
        client.post("/firehose", data=padded, headers={}),
    ):
        assert response.status_code == 413, response.status_code
        assert error_shape_problem(413, response.content_type, response.data) is None
        assert response.get_json()["error"]["code"] == "payload_too_large"


# --------------------------------------------------------------- the real gunicorn


def queued_total(url: str) -> float:
    """Messages the web stored (firehose_ingest_total{outcome="queued"}), summed over types."""
    text = requests.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("firehose_ingest_total{") and 'outcome="queued"' in line
    )


def worker_totals(stack: Stack) -> tuple[int, int]:
    stats = stack.redis.hgetall(KEYS.stats)
    return int(stats.get(b"delivered", 0)), int(stats.get(b"dead_lettered", 0))


@pytest.fixture(scope="module")
def hostile_books(fault_stack: Stack, fault_stub: Stub) -> dict[str, float]:
    """What the web had stored and the workers had finished before the hostile traffic."""
    wait_for(fault_stack.drained, 90, 0.2, "earlier work to drain")
    fault_stub.faults([])
    delivered, dead = worker_totals(fault_stack)
    return {"queued": queued_total(fault_stack.url), "delivered": delivered, "dead": dead}


def test_mutated_samples_through_gunicorn(
    fault_stack: Stack, hostile_books: dict[str, float], fault_results: Results, fault_token: str, wrong_token: str
) -> None:
    session = requests.Session()

    def send(body: bytes, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
        # requests refuses to send a header value with leading blanks; the test client covers those.
        headers = {name: value.strip() for name, value in headers.items()}
        response = session.post(f"{fault_stack.url}/firehose", data=body, headers=headers, timeout=10)
        return response.status_code, response.headers.get("Content-Type"), response.content

    _run_fuzz(
        "Hypothesis: mutated shared samples through gunicorn (workers deliver what was accepted)",
        80,
        send,
        fault_results,
        fault_token,
        wrong_token,
    )


def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error answer in the one JSON error shape."""
    problem = error_shape_problem(
        response.status_code, response.headers.get("content-type", [None])[0], response.content
    )
    if problem:
        raise AssertionError(problem)
    return None


def test_schemathesis_against_the_running_service(fault_stack: Stack, fault_token: str, fault_results: Results) -> None:
    """Every documented operation with schema-derived input, from the live /openapi.json.

    The web validates only the envelope and takes unknown values (the workers validate the
    rest), so "schema-violating data accepted" and "schema-valid data rejected" are not
    failures here; server errors and answers that break the documented responses are.
    """
    api = schemathesis.openapi.from_url(f"{fault_stack.url}/openapi.json")
    tally, failures = Tally(), {}
    operations = [result.ok() for result in api.get_all_operations()]
    for operation in operations:

        @seed(FUZZ_SEED)
        @settings(max_examples=25, **FUZZ_SETTINGS)
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Token {fault_token}"}, timeout=10)
            tally.add(response.status_code)
            try:
                case.validate_response(
                    response,
                    excluded_checks=[negative_data_rejection, positive_data_acceptance],
                    additional_checks=[error_shape],
                )
            except Exception as exc:  # noqa: BLE001 - collected, reported below
                failures.setdefault(case.operation.label, f"{str(exc)[:1500]}")

        run()
    fault_results.record_tally(
        "Schemathesis against the running service's /openapi.json",
        tally,
        f"{len(operations)} operations; answers: {tally.summary()}; failing operations: {len(failures)}",
    )
    assert tally.inputs > 0
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _valid_body(api_key: str = "sample-key") -> bytes:
    return orjson.dumps(fresh_message("event_processing_request", api_key))


PROTOCOL_ABUSE = {
    "Content-Length over the limit, no body sent": lambda t: request_head("/firehose", MAX_BODY + 1, t),
    "Content-Length larger than the body, then EOF": lambda t: request_head("/firehose", 4000, t) + _valid_body(),
    "not JSON, with a valid token": lambda t: request_head("/firehose", 9, t) + b"not json!",
    "invalid UTF-8 body": lambda t: request_head("/firehose", 4, t) + b'"\xff"\n',
    "NaN body": lambda t: request_head("/firehose", 3, t) + b"NaN",
    "nesting 5000 deep": lambda t: request_head("/firehose", 10000, t) + b"[" * 5000 + b"]" * 5000,
    "no Authorization": lambda t: request_head("/firehose", None, None) + b"",
    "GET /firehose": lambda t: b"GET /firehose HTTP/1.1\r\nHost: x\r\n\r\n",
    "DELETE /firehose": lambda t: b"DELETE /firehose HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "unknown path": lambda t: b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "chunked body, valid": lambda t: (
        request_head("/firehose", None, t, "Transfer-Encoding: chunked")
        + b"%x\r\n" % len(_valid_body())
        + _valid_body()
        + b"\r\n0\r\n\r\n"
    ),
    "chunked body, bad chunk size": lambda t: (
        request_head("/firehose", None, t, "Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n"
    ),
    "Transfer-Encoding: gzip": lambda t: request_head("/firehose", None, t, "Transfer-Encoding: gzip") + b"x",
    "Authorization header of 10 000 bytes": lambda t: (
        request_head("/firehose", 2, None, "Authorization: Token " + t * 300) + b"{}"
    ),
    "request line of 10 000 bytes": lambda t: b"POST /firehose/" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "token in a malformed header": lambda t: (
        b"POST /firehose HTTP/1.1\r\nHost: x\r\nAuthorization : Token "
        + t.encode()
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    ),
    "token with a control character": lambda t: (
        b"POST /firehose HTTP/1.1\r\nHost: x\r\nAuthorization: Token "
        + t.encode()
        + b"\x01\r\nContent-Length: 2\r\n\r\n{}"
    ),
}


# Requests gunicorn's HTTP parser refuses before the app sees them.
REFUSED_BY_GUNICORN = [
    "Transfer-Encoding: gzip",
    "Authorization header of 10 000 bytes",
    "request line of 10 000 bytes",
    "token in a malformed header",
    "token with a control character",
]


def _abuse(what: str, port: int, token: str) -> Any:
    data = PROTOCOL_ABUSE[what](token)
    if not what.startswith("Content-Length larger"):
        return raw_request(port, data, timeout=15)
    # Half-closed: the body ends early and the client waits for the answer.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_answer(sock, 15)


def _record_abuse(results: Results, what: str, answer: Any) -> None:
    status = answer.status if answer else 0
    results.record(
        f"HTTP abuse: {what}",
        inputs=1,
        status_5xx=int(status >= 500),
        accepted=int(200 <= status < 300),
        notes=f"answer: {status or 'connection closed'} {answer.headers.get('content-type', '') if answer else ''}",
    )


@pytest.mark.parametrize("what", [w for w in PROTOCOL_ABUSE if w not in REFUSED_BY_GUNICORN])
def test_http_protocol_abuse_gets_a_json_error_and_no_5xx(
    what: str, fault_stack: Stack, fault_token: str, fault_results: Results
) -> None:
    answer = _abuse(what, _port(fault_stack.url), fault_token)
    _record_abuse(fault_results, what, answer)
    assert answer is not None, "connection closed without an answer"
    assert error_shape_problem(answer.status, answer.headers.get("content-type"), answer.body) is None, (
        f"{answer.status} {answer.headers} {answer.body[:300]!r}"
    )


def test_requests_gunicorn_refuses_get_the_json_error_shape(
    fault_stack: Stack, fault_token: str, fault_results: Results
) -> None:
    """Malformed HTTP that gunicorn's parser refuses is answered by gunicorn itself, before the
    app: those answers must be in the error shape too, and never a 5xx."""
    problems = []
    for what in REFUSED_BY_GUNICORN:
        answer = _abuse(what, _port(fault_stack.url), fault_token)
        _record_abuse(fault_results, what, answer)
        problem = (
            "no answer"
            if answer is None
            else error_shape_problem(answer.status, answer.headers.get("content-type"), answer.body)
        )
        if problem:
            problems.append(f"{what}: {problem[:90]}")
    assert not problems, "\n".join(problems)


def _answered_quickly(url: str, token: str, within: float) -> bool:
    try:
        return post(url, _valid_body(), token, timeout=within).status_code == 202
    except requests.RequestException:
        return False


def test_trickled_body_is_answered_and_others_are_served(
    fault_stack: Stack, fault_token: str, fault_results: Results
) -> None:
    """A client sending its body byte by byte over ~3 s gets its answer; others are served meanwhile."""
    body = _valid_body()
    slow = SlowClient(_port(fault_stack.url), body, fault_token)
    served, tried = 0, 0
    try:
        deadline = time.monotonic() + 30
        while not slow.done() and time.monotonic() < deadline:
            slow.trickle(max(1, len(body) // 600))
            time.sleep(0.005)
            if slow.sent % 200 < 2:
                tried += 1
                served += _answered_quickly(fault_stack.url, fault_token, 3)
        answer = slow.answer(10)
    finally:
        slow.close()
    fault_results.record(
        "Slow client: body trickled byte by byte for ~3 s",
        inputs=1 + tried,
        status_5xx=int(bool(answer and answer.status >= 500)),
        accepted=served + int(bool(answer and answer.status == 202)),
        notes=f"slow client answered {answer.status if answer else 'nothing'}; "
        f"{served}/{tried} other clients served meanwhile",
    )
    assert answer is not None and answer.status == 202
    assert served == tried


def test_clients_stalled_mid_body_do_not_starve_others(
    fault_stack: Stack, fault_token: str, fault_results: Results
) -> None:
    """Clients that stop mid-body, one more than there are gunicorn workers: the service must time
    them out without a 5xx, and answer a normal client meanwhile."""
    stalled = [SlowClient(_port(fault_stack.url), _valid_body(), fault_token) for _ in range(3)]
    try:
        for client_ in stalled:
            client_.trickle(100)  # then nothing more
        time.sleep(0.5)
        started = time.monotonic()
        served = _answered_quickly(fault_stack.url, fault_token, 3)
        waited = time.monotonic() - started
        # And the stalled ones: an answer in the error shape, or a closed connection; never a 5xx.
        answers = [c.answer(15) for c in stalled]
    finally:
        for client_ in stalled:
            client_.close()
    recovered = wait_for(lambda: _answered_quickly(fault_stack.url, fault_token, 2), 30, 0.5, "the web to answer")
    fault_results.record(
        "Slow clients: 3 connections stall mid-body (gunicorn has 2 workers)",
        inputs=4,
        status_5xx=sum(1 for a in answers if a and a.status >= 500),
        accepted=int(served),
        notes=(
            f"a normal client {'was served' if served else 'got no answer'} within {waited:.1f} s; "
            f"stalled ones got {[a.status if a else 'closed' for a in answers]}; healthy after: {bool(recovered)}"
        ),
    )
    assert all(
        a is None or error_shape_problem(a.status, a.headers.get("content-type"), a.body) is None for a in answers
    )
    assert served, "stalled clients held every gunicorn worker: a normal client got no answer within 3 s"


def test_a_deeply_nested_dead_letter_can_be_shown(fault_stack: Stack, quiet_partner: Stub, fault_token: str) -> None:
    """Valid JSON 600 levels deep (orjson reads up to 1024, writes 254): a small message is refused
    at the door. As deep as the door takes in an event's unknown field (254 with the message
    object), and 600 deep in an event of a big batch (the door leaves a big message's events
    unparsed, service/message_view.py): stored, and the worker skips and counts that event, which
    its partner payload could not hold, and sends the rest (workers/repair.py). The partner
    refuses this key, so each ends as a dead letter whose body nests that deep, and
    `flask dlq show` must still show it."""
    api_key = "deep-nesting-key"
    quiet_partner.faults([{"path_prefix": "/v1", "status": 400, "api_key_sha256": sha(api_key)}])
    small = fresh_message("event_processing_request", api_key)
    small["events"][0]["x_deep"] = "DEEP"
    big = copy.deepcopy(small)
    big["id"] = str(uuid.uuid4())
    big["events"] += [dict(big["events"][1], id=str(uuid.uuid4())) for _ in range(40)]

    def nested(message: dict, lists: int) -> bytes:
        return orjson.dumps(message).replace(b'"DEEP"', b"[" * lists + b"]" * lists)

    refused = post(fault_stack.url, nested(small, 600), fault_token)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_json"
    # Message, events and event are three levels: 251 more make the 254 the door takes.
    assert post(fault_stack.url, nested(small, 251), fault_token).status_code == 202
    assert len(nested(big, 600)) > 16 * 1024
    assert post(fault_stack.url, nested(big, 600), fault_token).status_code == 202
    app = create_app(Settings(redis_url=fault_stack.redis_url, broker_url=fault_stack.redis_url))
    for message in (small, big):
        wait_for(lambda m=message: dead_letters.get(fault_stack.redis, KEYS, m["id"]), 30, 0.2, "the dead letter")
        shown = app.test_cli_runner().invoke(args=["dlq", "show", message["id"]])
        assert shown.exit_code == 0, f"{shown.output[-500:]}\n{shown.exception!r}"
        assert '"reason": "partner_rejected"' in shown.output
    skipped = {k.decode(): int(v) for k, v in fault_stack.redis.hgetall(KEYS.skipped_events).items()}
    assert skipped.get("unserialisable", 0) >= 2


def test_service_healthy_after_hostile_input(
    fault_stack: Stack,
    fault_stub: Stub,
    hostile_books: dict[str, float],
    fault_token: str,
    sent_secrets: dict[str, str],
    fault_results: Results,
) -> None:
    """Ready, delivering, and every hostile message it stored ended delivered or dead-lettered."""
    assert requests.get(f"{fault_stack.url}/readyz", timeout=5).status_code == 200
    api_key = new_secret("ak_after_hostile")
    sent_secrets["apiKey after hostile input"] = api_key
    message = fresh_message("event_processing_request", api_key)
    assert post(fault_stack.url, message, fault_token).status_code == 202
    wanted = {e["id"] for e in message["events"]}
    wait_for(
        lambda: wanted <= set(fault_stub.state()["events_by_api_key"].get(sha(api_key), {})),
        60,
        0.2,
        "a normal message delivered after the hostile input",
    )
    wait_for(fault_stack.drained, 120, 0.5, "the hostile messages to be delivered or dead-lettered")
    delivered, dead = worker_totals(fault_stack)
    stored = queued_total(fault_stack.url) - hostile_books["queued"]
    finished = (delivered - hostile_books["delivered"]) + (dead - hostile_books["dead"])
    failures = [
        line
        for path in sorted(Path(fault_stack.logs_dir).glob("faults-worker*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if "raised unexpected" in line or '"level": "ERROR"' in line or '"level": "CRITICAL"' in line
    ]
    fault_results.record(
        "After the hostile input: stored messages accounted for",
        inputs=int(stored),
        status_5xx=0,
        accepted=int(stored),
        delivered=delivered - int(hostile_books["delivered"]),
        dead_lettered=dead - int(hostile_books["dead"]),
        notes=f"/readyz 200 and a normal message delivered; worker ERROR lines: {len(failures)}",
    )
    assert finished == stored, f"stored {stored}, delivered or dead-lettered {finished}"
    assert not failures, failures[:5]
