"""Reading a request body without letting a broken or stalled client hold a worker."""

from __future__ import annotations

from flask import Request

from service.errors import ApiError

try:  # gunicorn's body reader raises its own parse errors for malformed chunked bodies
    from gunicorn.http.errors import ParseException
except ImportError:  # pragma: no cover - another WSGI server
    ParseException = ValueError  # type: ignore[assignment,misc]


def read_body(request: Request, timeout_seconds: float, max_bytes: int | None = None) -> bytes:
    """The body, or an ApiError: 408 for a client that stops sending, 400 for a broken body,
    413 over `max_bytes` (or the app's MAX_CONTENT_LENGTH).

    Under gunicorn each read from the client gets `timeout_seconds`: with sync workers a client
    that stalls mid-body would otherwise hold a whole worker until gunicorn kills it. A 408 is
    what mParticle retries, should it ever be the slow one.
    """
    if max_bytes is not None:
        request.max_content_length = min(max_bytes, request.max_content_length or max_bytes)
    sock = request.environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    if sock is not None:
        sock.settimeout(timeout_seconds)
    try:
        return request.get_data(cache=False)
    except TimeoutError:
        raise ApiError(408, "request_timeout", "The request body did not arrive in time.") from None
    except (OSError, ParseException) as exc:
        raise ApiError(400, "invalid_body", f"The request body could not be read ({type(exc).__name__}).") from None
    finally:
        if sock is not None:
            sock.settimeout(previous)
