"""Per-request log context for the web: a request id, the message it carried, one summary line.

The request id comes from `X-Request-Id` when the caller sent a sane one (a load balancer's,
say), else a new one; it is echoed in the response so a caller can quote it. Every record
logged while the request runs carries it (common.logging_setup.ContextFilter), and so do the
message id, account id and type once the view has read them (`note_message`).

Each Firehose request gets one `firehose_request` line. Under gunicorn.conf.py the access line
is that line (`summary_by_access_log`): the summary's fields travel in the WSGI environ and
gunicorn writes them once the answer has left, so the request path formats and writes no line
of its own. Elsewhere (flask run, the test client) this module writes it.

Logging itself is configured by the process entry points: gunicorn.conf.py for the web,
workers/celery_app.py for the workers.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import time
from typing import Any

from flask import Flask, Response, g, request

from common.logging_setup import bind_log_context, reset_log_context

log = logging.getLogger("service.requests")

REQUEST_ID_HEADER = "X-Request-Id"
# Anything else (too long, spaces, control characters) is replaced rather than echoed into
# a response header and every log line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# The endpoints whose requests get a summary line; health checks and scrapes would drown it.
SUMMARY_BLUEPRINTS = frozenset({"firehose"})
# Where the summary's fields wait for the access line (gunicorn.conf.py reads them).
SUMMARY_ENVIRON_KEY = "firehose.summary"

_summary_by_server = False


def summary_by_access_log() -> None:
    """From now on the server's access line carries each request's summary; this module writes none."""
    global _summary_by_server
    _summary_by_server = True


class _RequestIds:
    """32 hex digits unique to each request: a random per-process prefix and a counter.

    A uuid4 per request costs a getrandom call; ids need to be unique, not unpredictable.
    The prefix is drawn again in every forked child, so gunicorn workers never share one.
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(10)
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFF:012x}"


_request_ids = _RequestIds()


def message_fields(message: Any) -> dict[str, Any] | None:
    """What the parsed message says it is, for log lines and metric labels (None: not an object).

    Read before validation, so only values of the right JSON type, cut short, are kept.
    """
    if not isinstance(message, dict):
        return None
    kind = message.get("type")
    message_id = message.get("id")
    account = message.get("account")
    account_id = account.get("account_id") if isinstance(account, dict) else None
    return {
        "message_type": kind[:100] if isinstance(kind, str) else None,
        "message_id": message_id[:64] if isinstance(message_id, str) else None,
        "account_id": account_id if type(account_id) is int else None,
    }


def note_message(message: Any) -> None:
    """Records `message_fields` for this request's log lines and metric labels."""
    fields = message_fields(message)
    if fields is not None:
        g.message_fields = fields
        bind_log_context(**fields)


def request_id_for(presented: str | None) -> str:
    """The caller's X-Request-Id when it is a sane one, else a new id."""
    return presented if presented and _REQUEST_ID.fullmatch(presented) else _request_ids.next()


def finish_summary(environ: dict[str, Any], status: int, summary: dict[str, Any], started: float | None) -> None:
    """The request's `firehose_request` line: handed to the access line under gunicorn.conf.py,
    else written now."""
    if _summary_by_server:
        environ[SUMMARY_ENVIRON_KEY] = summary
        return
    duration_ms = round((time.perf_counter() - started) * 1000, 3) if started else None
    log_summary(log, status, summary, {"duration_ms": duration_ms})


def _begin() -> None:
    g.request_id = request_id_for(request.headers.get(REQUEST_ID_HEADER))
    g.log_started = time.perf_counter()
    g.log_token = bind_log_context(request_id=g.request_id)


def _finish(response: Response) -> Response:
    if "request_id" in g:
        response.headers[REQUEST_ID_HEADER] = g.request_id
    if request.blueprint in SUMMARY_BLUEPRINTS:
        _summary(response)
    return response


def _summary(response: Response) -> None:
    summary = {"error": g.get("error_code"), **(g.get("message_fields") or {})}
    finish_summary(request.environ, response.status_code, summary, g.get("log_started"))


def log_summary(logger: logging.Logger, status: int, summary: dict[str, Any], fields: dict[str, Any]) -> None:
    """The `firehose_request` line: the answer's status, the message's fields and any others."""
    logger.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "firehose_request type=%s status=%s error=%s message_id=%s",
        summary.get("message_type"),
        status,
        summary.get("error"),
        summary.get("message_id"),
        extra={**fields, **summary, "event": "firehose_request", "status": status},
    )


def _end(_exc: BaseException | None) -> None:
    token = g.pop("log_token", None)
    if token is not None:
        # Back to what was bound before the request: a sync worker's next request starts clean.
        reset_log_context(token)


def init_app(app: Flask) -> None:
    app.before_request(_begin)
    app.after_request(_finish)
    app.teardown_request(_end)
