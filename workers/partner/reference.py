"""The reference partner client: HTTP JSON, as written down in docs/partner-api.md."""

from __future__ import annotations

import threading
import time
from email.utils import parsedate_to_datetime

import orjson
import requests
from requests.adapters import HTTPAdapter

from common.config import Settings
from common.redaction import redact_secrets
from schemas.fields import is_header_value
from workers.partner.base import Operation, OperationKind, PartnerResult

ROUTES: dict[OperationKind, tuple[str, str]] = {
    OperationKind.EVENTS: ("POST", "/v1/events"),
    OperationKind.AUDIENCE_UPSERT: ("PUT", "/v1/audiences/{audience_id}"),
    OperationKind.AUDIENCE_DELETE: ("DELETE", "/v1/audiences/{audience_id}"),
    OperationKind.MEMBERS: ("POST", "/v1/audiences/{audience_id}/members"),
    OperationKind.ERASE: ("DELETE", "/v1/users"),
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ReferencePartnerClient:
    """One instance per worker process, shared by its pool's threads.

    `requests.Session` is not documented as thread-safe (its cookie jar and adapters are
    mutated per request), so each thread gets a Session of its own, built on first use, each
    with a small connection pool kept alive to the partner between calls.
    """

    def __init__(self, base_url: str, timeout: float, pool_size: int = 2) -> None:
        self.base_url = base_url.rstrip("/")
        # Connect fails fast; the read timeout is the partner's own budget.
        self.timeout = (min(3.05, timeout), timeout)
        self.pool_size = pool_size
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        """This thread's session (one per thread: see the class docstring)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._new_session()
        return session

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        # One thread makes one call at a time: a couple of kept-alive connections is plenty.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update({"Content-Type": "application/json", "User-Agent": "firehose-relay"})
        return session

    @classmethod
    def from_settings(cls, settings: Settings) -> ReferencePartnerClient:
        """How workers/runtime.py builds the client PARTNER_CLIENT names."""
        return cls(settings.partner_api_url, settings.partner_timeout_seconds)

    def send(self, operation: Operation, idempotency_key: str) -> PartnerResult:
        if not is_header_value(operation.api_key):
            # requests would refuse CR/LF with InvalidHeader (a "no answer", retried as if
            # transient) and http.client a character beyond Latin-1 with UnicodeEncodeError
            # (escaping the task, failing its whole group). Neither ever changes: answer as a
            # partner's 400 would, permanent, without a call. Delivery rejects such a key
            # before the gate already; this keeps any other caller of the client safe too.
            return PartnerResult(400, error="invalid_api_key: not a valid HTTP header value (not sent)")
        method, path = ROUTES[operation.kind]
        url = self.base_url + path.format(audience_id=operation.audience_id)
        try:
            response = self.session.request(
                method,
                url,
                data=orjson.dumps(operation.payload),
                headers={
                    "Authorization": f"Bearer {operation.api_key}",
                    "Idempotency-Key": idempotency_key,
                },
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.Timeout:
            return PartnerResult(None, error="timeout")
        except requests.ConnectionError:
            return PartnerResult(None, error="connection_error")
        except requests.RequestException as exc:
            return PartnerResult(None, error=type(exc).__name__)
        error = None
        if response.status_code >= 300:
            # A short excerpt for the dead-letter record, never logged. A partner may echo the
            # credentials it refused: take them out before cutting, so no fragment is left.
            # Before the cut: a key echoed in an encoding and cut at the boundary would be unrecognisable.
            excerpt = redact_secrets(response.text[:4096], (operation.api_key,))[:200]
            error = f"HTTP {response.status_code}: {excerpt}"
        return PartnerResult(
            response.status_code,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            error=error,
        )
