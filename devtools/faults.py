"""What the fault and fuzz suite (tests/e2e/faults/) shares: its figures, fresh messages, the
partner's ledger by idempotency key, the one error shape, a private Redis, misbehaving
HTTP clients and the secrets it sent.

Everything here talks to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import requests

from devtools.partner_stub.client import Stub
from devtools.samples import FIXTURES
from schemas.messages import DSR, EVENTS, MEMBERSHIP, SUBSCRIPTION

# The project's own sample messages: a fresh clone has them (the shared SDK corpus is extra).
SAMPLES = FIXTURES
# Where the suite writes one JSON line per figure row; devtools/fault_table.py renders them.
RESULTS_ENV = "FAULT_RESULTS"

# Fixture file (3.2.0) of each message type that carries work.
KIND_SAMPLES = {
    EVENTS: "EventProcessingRequest_ios.json",
    SUBSCRIPTION: "AudienceSubscriptionRequest.json",
    MEMBERSHIP: "AudienceMembershipChangeRequest.json",
    DSR: "DsrProcessingRequest.json",
}


# ------------------------------------------------------------------------------ figures


class Results:
    """One JSON line per row of the fault table: what a test tried and what came of it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(
        self,
        fault: str,
        *,
        inputs: int,
        status_5xx: int,
        accepted: int | None = None,
        delivered: int | None = None,
        applied_twice: int | None = None,
        repeats: int | None = None,
        dead_lettered: int | None = None,
        notes: str = "",
    ) -> None:
        row = {
            "fault": fault,
            "inputs": inputs,
            "status_5xx": status_5xx,
            "accepted": accepted,
            "delivered": delivered,
            "applied_twice": applied_twice,
            "repeats": repeats,
            "dead_lettered": dead_lettered,
            "notes": notes,
            "at": round(time.time(), 3),
        }
        with open(self.path, "ab") as handle:
            handle.write(orjson.dumps(row) + b"\n")

    def record_tally(self, fault: str, tally: Tally, notes: str) -> None:
        """A row for answers only (no delivery): inputs, 5xx and 2xx counted from `tally`."""
        self.record(
            fault,
            inputs=tally.inputs,
            status_5xx=tally.between(500, 600),
            accepted=tally.between(200, 300),
            notes=notes,
        )


@dataclass
class Tally:
    """Answers by status class, for the rows of the hostile-input tests."""

    statuses: Counter = field(default_factory=Counter)

    def add(self, status: int) -> None:
        self.statuses[status] += 1

    @property
    def inputs(self) -> int:
        return sum(self.statuses.values())

    def between(self, low: int, high: int) -> int:
        return sum(n for status, n in self.statuses.items() if low <= status < high)

    def summary(self) -> str:
        return " ".join(f"{status}x{n}" for status, n in sorted(self.statuses.items()))


# ----------------------------------------------------------------------------- messages


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    """A value that cannot occur in a log by chance: finding it there means it leaked."""
    return f"{prefix}_{uuid.uuid4().hex}"


def fresh_message(kind: str, api_key: str, version: str = "3.2.0", events: int = 2) -> dict[str, Any]:
    """A fixture message of `kind` with new ids, carrying `api_key` as its account's apiKey."""
    message = orjson.loads((SAMPLES / version / KIND_SAMPLES[kind]).read_bytes())
    message["id"] = str(uuid.uuid4())
    account = message.setdefault("account", {"account_id": 4242})
    account.setdefault("account_settings", {})["apiKey"] = api_key
    if kind == EVENTS:
        template = message["events"][0]
        message["events"] = [dict(template, id=str(uuid.uuid4())) for _ in range(events)]
    elif kind == DSR:
        message["subject_request_id"] = str(uuid.uuid4())
    return message


def expected_keys(message: dict[str, Any]) -> list[str]:
    """The Idempotency-Keys the relay sends this message's partner calls with."""
    from workers.mapping import plan_message

    return [operation.idempotency_key() for operation in plan_message(message).operations]


@dataclass
class Ledger:
    """What the partner stub received for a set of messages.

    Event batches of one API key may share a call (workers/grouping.py), so an event batch
    counts as delivered when the partner applied every one of its events under its apiKey;
    any other message when each of its calls (by the Idempotency-Key the relay gives it)
    was answered 2xx.
    """

    messages: int
    delivered: int  # messages the partner has in full
    missing: list[str]  # ids of the others
    applied_twice: int  # events the partner applied more than once, calls applied beyond the plan
    repeats: int  # calls repeated with a key already answered 2xx (dropped by the partner)
    faulted: int  # calls answered with an injected fault
    calls: list[dict[str, Any]]  # every call made with these messages' apiKeys


def _api_key(message: dict[str, Any]) -> str:
    return message["account"]["account_settings"]["apiKey"]


def ledger(stub: Stub, messages: list[dict[str, Any]]) -> Ledger:
    ours = {sha(_api_key(m)) for m in messages}
    calls = [c for c in stub.requests("/v1") if c["api_key_sha256"] in ours]
    state = stub.state()
    applied_by_key: Counter = Counter(
        c["idempotency_key"] for c in calls if c["status"] and 200 <= c["status"] < 300 and not c["duplicate"]
    )
    delivered, missing, applied_twice = 0, [], 0
    for message in messages:
        if message["type"] == EVENTS:
            counts = state["events_by_api_key"].get(sha(_api_key(message)), {})
            ok = all(counts.get(e["id"], 0) >= 1 for e in message["events"])
            applied_twice += sum(1 for e in message["events"] if counts.get(e["id"], 0) > 1)
        else:
            keys = expected_keys(message)
            ok = all(applied_by_key[k] >= 1 for k in keys)
            applied_twice += sum(max(0, applied_by_key[k] - 1) for k in keys)
        delivered += ok
        if not ok:
            missing.append(message["id"])
    repeats = sum(1 for c in calls if c["duplicate"])
    faulted = sum(1 for c in calls if c["fault"])
    return Ledger(len(messages), delivered, missing, applied_twice, repeats, faulted, calls)


def post(url: str, message: dict[str, Any] | bytes, token: str | None, timeout: float = 10) -> requests.Response:
    body = message if isinstance(message, bytes) else orjson.dumps(message)
    headers = {"Authorization": f"Token {token}"} if token else {}
    return requests.post(f"{url}/firehose", data=body, headers=headers, timeout=timeout)


# -------------------------------------------------------------------------- error shape


def error_shape_problem(status: int, content_type: str | None, body: bytes) -> str | None:
    """None when the answer is fine: below 500, and an error in `{"error": {"code", "message", "fields"?}}`."""
    if status >= 500:
        return f"server error {status}"
    if status < 400:
        return None
    if not (content_type or "").startswith("application/json"):
        return f"{status} with Content-Type {content_type!r}: {body[:120]!r}"
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{status} body is not JSON: {body[:120]!r}"
    if not isinstance(answer, dict) or set(answer) != {"error"} or not isinstance(answer["error"], dict):
        return f"{status} body is not {{'error': {{...}}}}: {answer!r:.200}"
    error = answer["error"]
    if not {"code", "message"} <= set(error) <= {"code", "message", "fields"}:
        return f"{status} error has keys {sorted(error)}"
    if not isinstance(error["code"], str) or not error["code"] or not isinstance(error["message"], str):
        return f"{status} error code/message are not strings: {error!r:.200}"
    if "fields" in error and not isinstance(error["fields"], dict):
        return f"{status} error fields is not an object: {error!r:.200}"
    return None


# ----------------------------------------------------------------------- private Redis


# ------------------------------------------------------------------- raw HTTP clients


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def _recv(sock: socket.socket) -> bytes:
    """The next bytes from the server; b"" once it closed or reset the connection."""
    try:
        return sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def read_answer(sock: socket.socket, timeout: float) -> RawAnswer | None:
    """Read one HTTP/1.x answer; None if the server closed without one."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        chunk = _recv(sock)
        if not chunk:
            break
        data += chunk
    if b"\r\n\r\n" not in data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(body) < length and time.monotonic() < deadline:
        chunk = _recv(sock)
        if not chunk:
            break
        body += chunk
    return RawAnswer(status, headers, body)


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> RawAnswer | None:
    """Send `data` as is (a request line, headers and body of our own making) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_answer(sock, timeout)


def request_head(path: str, length: int | None, token: str | None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if token:
        lines.append(f"Authorization: Token {token}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class SlowClient:
    """A connection that sends its headers, then its body a few bytes at a time, or stalls."""

    def __init__(self, port: int, body: bytes, token: str | None) -> None:
        self.body = body
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(request_head("/firehose", len(body), token))
        self.sent = 0

    def trickle(self, count: int = 1) -> bool:
        """Send the next `count` bytes; False once the server stopped listening."""
        try:
            self.sock.sendall(self.body[self.sent : self.sent + count])
        except OSError:
            return False
        self.sent += count
        return True

    def done(self) -> bool:
        return self.sent >= len(self.body)

    def answer(self, timeout: float) -> RawAnswer | None:
        try:
            return read_answer(self.sock, timeout)
        except OSError:
            return None

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- secrets


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    """The names of the secrets found in `text`."""
    return sorted(name for name, value in secrets.items() if value in text)
