"""Reading a request body without letting a broken or stalled client hold a worker."""

from __future__ import annotations

from typing import Any

from flask import Request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.wrappers import Request as WSGIRequest

from service.errors import ApiError

try:  # gunicorn's body reader raises its own parse errors for malformed chunked bodies
    from gunicorn.http.errors import ParseException
except ImportError:  # pragma: no cover - another WSGI server
    ParseException = ValueError  # type: ignore[assignment,misc]


_buffered_by_server = False


def bodies_buffered_by_server() -> None:
    """From now on every request reaches the app with its whole body read (the web's own worker
    class, service/gunicorn_worker.py): no read can wait on the client, so none gets a timeout.
    Setting one cost three ioctl calls per request, each letting go of the GIL."""
    global _buffered_by_server
    _buffered_by_server = True


def read_sized_body(environ: dict[str, Any], length: int, limit: int, timeout_seconds: float) -> bytes:
    """The body of a request that gave its Content-Length (`length`), for the WSGI endpoint
    (service/endpoint.py): 413 past `limit`, read straight from the server's input when the
    server holds all of it, else as `read_body` reads any body."""
    if length > limit:
        raise ApiError(413, "payload_too_large", RequestEntityTooLarge.description)
    if _buffered_by_server:
        # werkzeug's wrapping of the stream, read again in chunks, cost more than the parse of a
        # small message's JSON.
        data = environ["wsgi.input"].read(length)
        if len(data) != length:  # the client closed its side before the end
            raise _read_error(None)
        return data
    return read_body(WSGIRequest(environ), timeout_seconds, limit)


def read_body(request: Request | WSGIRequest, timeout_seconds: float, max_bytes: int | None = None) -> bytes:
    """The body, or an ApiError: 408 for a client that stops sending, 400 for a broken body,
    413 over `max_bytes` (or the app's MAX_CONTENT_LENGTH).

    Under the web's own worker class (service/gunicorn_worker.py) the body is already in memory
    when the app reads it (`bodies_buffered_by_server`): the worker read it, within
    REQUEST_DEADLINE_SECONDS, before a thread ran the request. Under any other worker each read
    from the client gets `timeout_seconds`: a
    client that stalls mid-body would otherwise hold a worker until gunicorn kills it. A 408 is
    what mParticle retries, should it ever be the slow one.
    """
    if max_bytes is not None:
        request.max_content_length = min(max_bytes, request.max_content_length or max_bytes)
    sock = None if _buffered_by_server else request.environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    if sock is not None:
        sock.settimeout(timeout_seconds)
    try:
        return request.get_data(cache=False)
    except ClientDisconnected as exc:
        # Under a size limit (always, from create_app) werkzeug's LimitedStream reports every
        # read error as ClientDisconnected; the socket's own error is its context.
        raise _read_error(exc.__context__) from None
    except (OSError, ParseException) as exc:
        raise _read_error(exc) from None
    finally:
        if sock is not None:
            sock.settimeout(previous)


def _read_error(cause: BaseException | None) -> ApiError:
    if isinstance(cause, TimeoutError):
        return ApiError(408, "request_timeout", "The request body did not arrive in time.")
    what = type(cause).__name__ if cause is not None else "the client went away"
    return ApiError(400, "invalid_body", f"The request body could not be read ({what}).")
