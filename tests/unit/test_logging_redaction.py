"""No secret reaches a log line, and log lines are JSON with the fields operators search by.

These tests feed the redaction filter every shape a secret has been seen to take in a record.
(Every path through real gunicorn, Celery and partner-stub processes logging at DEBUG:
tests/e2e/test_logging_redaction.py.)
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from common.logging_setup import (
    RedactionFilter,
    bind_log_context,
    make_handler,
    redact_text,
    reset_log_context,
)

SECRET = "sk_live_9f8e7d6c5b4a"


# ----------------------------------------------------------------------- redact_text


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Token {SECRET}",
        f"authorization={SECRET}",
        f"{{'Authorization': 'Bearer {SECRET}', 'Accept': '*/*'}}",
        f'{{"HTTP_AUTHORIZATION": "Token {SECRET}"}}',
        f"sending with Bearer {SECRET} now",
        f"GET /firehose?x=1&token={SECRET}&y=2 HTTP/1.1",
        f"POST /hook?api_key={SECRET}",
        f'{{"account": {{"account_id": 1, "account_settings": {{"apiKey": "{SECRET}"}}}}}}',
        f"{{'account_settings': {{'apiKey': '{SECRET}', 'other': \"it's\"}}}}",
        f"Subscription(audience_subscription_settings={{'listId': '{SECRET}'}})",
        f'{{"previous_audience_subscription_settings": {{"k": "{SECRET}"}}}}',
        # A `}` inside a value must not end the map early.
        f'{{"account_settings": {{"a": "x}}y", "apiKey": "{SECRET}"}}}}',
        # Celery's argsrepr: the JSON body inside a Python string, cut short at 1024 characters.
        f"""['{{"type": "event_processing_request", "account_settings": {{"apiKey": "{SECRET}", "b": "...""",
        # JSON escaped inside JSON (a task's body inside a message): redacted to the end.
        f'{{"body": "{{\\"account_settings\\": {{\\"apiKey\\": \\"{SECRET}\\"}}}}"}}',
    ],
)
def test_secrets_in_text_are_redacted(text: str) -> None:
    assert SECRET not in redact_text(text)


def test_configured_tokens_are_redacted_anywhere() -> None:
    assert redact_text(f"token is {SECRET}!", [SECRET]) == "token is [redacted]!"
    # Too short to be a real token: redacting it would eat ordinary words.
    assert RedactionFilter(["abc", SECRET]).secrets == (SECRET,)


def test_text_without_secrets_is_left_alone() -> None:
    text = "delivery_attempt message_id=5b3c account_id=42 outcome=delivered status=202"
    assert redact_text(text) == text
    settings_free = '{"account": {"account_id": 1}, "events": [{"id": "x"}]}'
    assert redact_text(settings_free) == settings_free


def test_the_settings_keys_stay_readable() -> None:
    out = redact_text(f'{{"account_settings": {{"apiKey": "{SECRET}"}}, "events": []}}')
    assert out == '{"account_settings": [redacted], "events": []}'


# ------------------------------------------------------------------ RedactionFilter


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own with our JSON handler, writing to a buffer (the root logger untouched)."""
    stream = io.StringIO()
    logger = logging.getLogger(f"tests.redaction.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(make_handler("test", secrets=[SECRET], fmt="json", stream=stream))
    yield logger, stream
    logger.handlers.clear()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_filter_scrubs_message_args_extras_and_tracebacks(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    message = {"type": "x", "account": {"account_id": 7, "account_settings": {"apiKey": "customer-key-123"}}}
    logger.info("got %s with %r", message, {"Authorization": f"Token {SECRET}"})
    logger.info(
        "extras",
        extra={
            "event": "e",
            "body": orjson.dumps(message).decode(),
            "nested": [{"authorization": "Bearer abc"}, {"deep": {"account_settings": {"k": "customer-key-123"}}}],
            "headers": {"Authorization": f"Token {SECRET}"},
            "raw": orjson.dumps(message),
        },
    )
    try:
        raise ValueError(f"bad header Authorization: Token {SECRET} in {message}")
    except ValueError:
        logger.exception("failed")
    logger.info("stack", stack_info=True, extra={"event": "s", "token": SECRET})
    out = stream.getvalue()
    assert SECRET not in out
    assert "customer-key-123" not in out
    assert "Bearer abc" not in out
    records = lines(stream)
    assert len(records) == 4
    assert "Traceback" in records[2]["exc_info"] and "[redacted]" in records[2]["exc_info"]
    assert records[1]["nested"][1]["deep"]["account_settings"] == {"k": "[redacted]"}


def test_celery_task_context_loses_the_message_but_keeps_its_id(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    body = orjson.dumps({"id": "m1", "account": {"account_settings": {"apiKey": "customer-key-123"}}}).decode()
    context = {"id": "task-1", "name": "firehose.deliver", "args": repr([body]), "kwargs": "{}", "eta": None}
    logger.info("Task %(name)s[%(id)s] received", context, extra={"data": context})
    [record] = lines(stream)
    assert "customer-key-123" not in stream.getvalue()
    assert record["message"] == "Task firehose.deliver[task-1] received"
    assert record["task_id"] == "task-1" and record["task_name"] == "firehose.deliver"
    assert "data" not in record


def test_json_lines_carry_the_fields_and_the_bound_context(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    token = bind_log_context(request_id="req-1", message_id="msg-1", account_id=42)
    try:
        logger.warning("ingest_unavailable", extra={"event": "ingest_unavailable", "message_id": "own-id"})
    finally:
        reset_log_context(token)
    logger.info("no event named")
    first, second = lines(stream)
    assert {"timestamp", "level", "logger", "message", "event", "service", "pid"} <= set(first)
    assert first["event"] == "ingest_unavailable" and first["level"] == "WARNING"
    assert first["request_id"] == "req-1" and first["account_id"] == 42
    # A record's own field wins over the bound one.
    assert first["message_id"] == "own-id"
    assert second["event"] == "log" and "request_id" not in second


def test_redaction_filter_is_idempotent() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "Authorization: Token %s", (SECRET,), None)
    redaction = RedactionFilter([SECRET])
    redaction.filter(record)
    once = record.getMessage()
    redaction.filter(record)
    assert record.getMessage() == once
    assert SECRET not in once


def test_log_lines_are_written_whole(captured: tuple[logging.Logger, io.StringIO]) -> None:
    # A message with newlines stays one JSON line: a multi-line traceback cannot forge entries.
    logger, stream = captured
    logger.info('line one\n{"event": "forged"}')
    [record] = lines(stream)
    assert record["event"] == "log"


def test_text_format_is_redacted_too() -> None:
    stream = io.StringIO()
    logger = logging.getLogger(f"tests.redaction.text.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(make_handler("test", secrets=[SECRET], fmt="text", stream=stream))
    logger.warning("Authorization: Token %s", SECRET, extra={"event": "auth_seen"})
    logger.handlers.clear()
    line = stream.getvalue()
    assert SECRET not in line
    assert "[auth_seen]" in line and not line.lstrip().startswith("{")
