"""Logs for the web and the workers: one JSON object per line, with secrets scrubbed from every record.

Every handler we install carries two filters:

* `ContextFilter` adds what the current unit of work is about (request id, message id,
  account id) to records that do not name it themselves. The web binds it per request
  (service/request_log.py); anything can bind it with `bind_log_context`.
* `RedactionFilter` scrubs configured tokens, `Authorization` values, secret-looking query
  parameters and every `account_settings` / `audience_subscription_settings` value from the
  record's message, arguments, extras, exception and stack text. It runs on the record before
  any formatter sees it, so no output format can leak what it removed.

Nothing here imports Flask or Celery: gunicorn.conf.py, the Celery signals in
workers/celery_app.py and the Lambda handler all call `configure_logging` or `decorate`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from contextvars import ContextVar, Token
from typing import Any, TextIO

import orjson
from pythonjsonlogger.json import JsonEncoder, JsonFormatter

from common.config import Settings
from common.redaction import (
    MIN_SECRET_LENGTH,
    REDACTED,
    all_secret_forms,
    escape_control,
    redact_forms,
    redact_message,
)

# --------------------------------------------------------------------------- context

_EMPTY: Mapping[str, Any] = {}
_context: ContextVar[Mapping[str, Any]] = ContextVar("firehose_log_context", default=_EMPTY)


def bind_log_context(**fields: Any) -> Token[Mapping[str, Any]]:
    """Adds fields to every record logged from this context; `reset_log_context` undoes it.

    A new mapping each time (never mutated in place), so a reset token always restores
    exactly what was bound before.
    """
    return _context.set({**_context.get(), **fields})


def reset_log_context(token: Token[Mapping[str, Any]]) -> None:
    _context.reset(token)


def log_context() -> Mapping[str, Any]:
    return _context.get()


class ContextFilter(logging.Filter):
    """Fills request/message ids from the bound context; a record's own extras win."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if value is not None and not hasattr(record, key):
                setattr(record, key, value)
        return True


# ------------------------------------------------------------------------- redaction

# Keys whose values are credentials wherever they turn up in a structured extra.
_SENSITIVE_KEYS = frozenset(
    {"authorization", "http_authorization", "apikey", "api_key", "password", "secret", "token", "tokens", "auth_tokens"}
)
# `Authorization: Token x`, `'Authorization': 'Bearer x'`, `HTTP_AUTHORIZATION=...`, JSON or repr.
_AUTHORIZATION = re.compile(r"""(?i)(authorization\\*['"]?\s*[:=]\s*(?:\\*['"])?)[^'"\\\r\n]+""")
_BEARER = re.compile(r"""(?i)\b(bearer\s+)[^\s'"\\,;}\]]+""")
# ?token=..., &api_key=..., ;signature=...: a secret in a URL someone logged.
_QUERY_SECRET = re.compile(
    r"""(?i)([?&;][^=&\s#'"]*(?:token|key|secret|passw|auth|signature|sig|credential)[^=&\s#'"]*=)[^&\s#'"]+"""
)
# The customer's settings maps, as JSON, Python repr or `name=` text: `"account_settings": {`.
_SETTINGS_MAP = re.compile(r"""(?:account_settings|audience_subscription_settings)\\*['"]?\s*[:=]\s*""")


def _object_end(text: str, start: int) -> int:
    """Index just past the `{...}` that opens at `start`, or len(text) when unsure.

    Strings in either quote style are skipped so a `}` inside a value does not end the
    object early. Text with backslashes is JSON inside a string (escaped once more) or has
    escapes whose level we cannot know: there the rest of the text is treated as the object.
    Erring long only ever hides more.
    """
    depth = 0
    quote = ""
    for index in range(start, len(text)):
        char = text[index]
        if char == "\\":
            return len(text)
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return len(text)


def _redact_settings_maps(text: str) -> str:
    parts: list[str] = []
    position = 0
    while match := _SETTINGS_MAP.search(text, position):
        value_start = match.end()
        parts.append(text[position:value_start])
        if text.startswith("{", value_start):
            parts.append(REDACTED)
            position = _object_end(text, value_start)
        else:
            position = value_start
    parts.append(text[position:])
    return "".join(parts)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with known secrets (plain, JSON-escaped, URL- or base64-encoded), credentials in
    headers and URLs, and settings maps replaced."""
    return _redact_text(text, all_secret_forms(secrets))


def _redact_text(text: str, forms: Iterable[str]) -> str:
    text = redact_forms(text, forms)
    lowered = text.lower()
    if "authorization" in lowered:
        text = _AUTHORIZATION.sub(lambda m: m.group(1) + REDACTED, text)
    if "bearer" in lowered:
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    if "_settings" in text:
        text = _redact_settings_maps(text)
    return text


# The attributes every LogRecord has; anything else on a record is an extra.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_MAX_DEPTH = 8


class RedactionFilter(logging.Filter):
    """Scrubs secrets from a record in place, before any formatter renders it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH)
        # Every form a secret may be logged in (escaped, encoded), longest first, so a form
        # that contains another is replaced whole.
        self._forms = all_secret_forms(self.secrets)
        # Each rule of redact_text acts only on text holding one of these (a secret, the two
        # words in any case, "=", "_settings"): text without any comes back unchanged, so one
        # search decides what most strings of a record need, on every log line of the web.
        self._suspect = re.compile(
            "|".join(["(?i:authorization|bearer)", "=", "_settings", *(re.escape(s) for s in self._forms)])
        )

    def _text(self, text: str) -> str:
        return _redact_text(text, self._forms) if self._suspect.search(text) else text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._text(self._message(record))
        record.args = None
        self._lift_celery_context(record)
        attributes = record.__dict__
        # The extras only, found by one set difference rather than a test per attribute.
        for key in attributes.keys() - _RECORD_ATTRIBUTES:
            if key.startswith("_"):
                continue
            value = attributes[key]
            if key.lower() in _SENSITIVE_KEYS:
                setattr(record, key, REDACTED)
            else:
                scrubbed = self._scrub(value, 0)
                if scrubbed is not value:  # numbers, None and clean text stay as they are
                    setattr(record, key, scrubbed)
        if record.exc_info:
            # Rendered here so the traceback text is scrubbed too; formatters use exc_text.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self._text(record.exc_text)
        if record.stack_info:
            record.stack_info = self._text(record.stack_info)
        return True

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not lose the record
            return f"{record.msg!s} {record.args!r}"

    @staticmethod
    def _lift_celery_context(record: logging.LogRecord) -> None:
        # Celery passes its log context as extra={"data": {...}} with the task's arguments,
        # which are whole Firehose messages: customers' settings and personal data. Keep the
        # task's id and name, drop the rest (the message text already says what happened).
        data = getattr(record, "data", None)
        if isinstance(data, dict) and ("args" in data or "kwargs" in data):
            del record.data
            if data.get("id") is not None:
                record.task_id = str(data["id"])
            if data.get("name") is not None:
                record.task_name = str(data["name"])

    def _scrub(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self._text(value)
        if depth >= _MAX_DEPTH:
            return "[truncated]"
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in redact_message(value).items():
                sensitive = isinstance(key, str) and key.lower() in _SENSITIVE_KEYS
                out[key] = REDACTED if sensitive else self._scrub(item, depth + 1)
            return out
        if isinstance(value, list | tuple | set | frozenset):
            return [self._scrub(item, depth + 1) for item in redact_message(list(value))]
        if isinstance(value, bytes | bytearray):
            return self._text(bytes(value).decode("utf-8", "replace"))
        # Any other object would be rendered with str() by the formatter: scrub that text.
        return self._text(str(value))


# ------------------------------------------------------------------------ formatting

JSON = "json"
TEXT = "text"


def log_format(settings: Settings | None = None) -> str:
    """LOG_FORMAT: `json` (default, one object per line) or `text` (for a person at a terminal)."""
    return (settings or Settings.from_env()).log_format


def log_level(level: int | str | None = None, settings: Settings | None = None) -> int:
    """`level` as a number; without one, LOG_LEVEL from `settings` (or the environment's)."""
    if isinstance(level, int):
        return level
    name = (level or (settings or Settings.from_env()).log_level).strip().upper()
    if name.isdigit():
        return int(name)
    value = logging.getLevelName(name)
    return value if isinstance(value, int) else logging.INFO


class _JsonLines(JsonFormatter):
    """python-json-logger's JsonFormatter, written by orjson.

    The same fields and values; orjson writes them several times faster than json.dumps
    with the library's encoder class, which matters at two lines per request on the web.
    Types orjson does not know go through the library's encoder `default`, as before; what
    orjson refuses outright (an integer past 64 bits) takes the library's own json path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._default = JsonEncoder().default

    def jsonify_log_record(self, log_data: Any) -> str:
        try:
            return orjson.dumps(log_data, default=self._default, option=orjson.OPT_NON_STR_KEYS).decode()
        except orjson.JSONEncodeError:
            return super().jsonify_log_record(log_data)


class _TextLines(logging.Formatter):
    """Plain lines, one per record whatever the record holds.

    Every control character in the finished line is escaped (common.redaction.escape_control):
    a logged value (a message's `type`, a path, an exception's text) with a line break or a
    terminal escape in it cannot print a forged line or rewrite the screen. A traceback is
    one line too, its line breaks written as `\\n`: its text quotes values as well.
    """

    def format(self, record: logging.LogRecord) -> str:
        return escape_control(super().format(record))


def make_formatter(service: str, fmt: str | None = None) -> logging.Formatter:
    if (fmt or log_format()) == TEXT:
        return _TextLines("%(asctime)s %(levelname)s %(name)s [%(event)s] %(message)s", defaults={"event": "log"})
    return _JsonLines(
        "%(levelname)s %(name)s %(process)d %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        static_fields={"service": service},
        # Records from libraries (gunicorn, Celery, urllib3) name no event of their own.
        defaults={"event": "log"},
        timestamp=True,
    )


_OURS = "_firehose_handler"


def decorate(handler: logging.Handler, service: str, secrets: Iterable[str] = (), fmt: str | None = None) -> None:
    """Gives an existing handler (gunicorn's own, say) our format, context and redaction."""
    for old in [f for f in handler.filters if isinstance(f, ContextFilter | RedactionFilter)]:
        handler.removeFilter(old)
    # Context first, so what it adds is scrubbed too.
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactionFilter(secrets))
    handler.setFormatter(make_formatter(service, fmt))


def make_handler(
    service: str, secrets: Iterable[str] = (), fmt: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stdout)
    decorate(handler, service, secrets, fmt)
    setattr(handler, _OURS, True)
    return handler


def configure_logging(
    service: str,
    level: int | str | None = None,
    secrets: Iterable[str] = (),
    fmt: str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Routes the root logger to one handler of ours (replacing an earlier one of ours).

    Idempotent: Celery calls it again in each pool process, gunicorn on a config reload.
    Handlers that others put on the root logger are left alone.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
    handler = make_handler(service, secrets, fmt, stream)
    root.addHandler(handler)
    root.setLevel(log_level(level))
    return handler
