"""The reference partner client: HTTP JSON, as written down in docs/partner-api.md."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import orjson
import requests
from requests.adapters import HTTPAdapter

from common.config import Settings
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
    """One instance per worker process: its session pools connections to the partner."""

    def __init__(self, base_url: str, timeout: float, pool_size: int = 10) -> None:
        self.base_url = base_url.rstrip("/")
        # Connect fails fast; the read timeout is the partner's own budget.
        self.timeout = (min(3.05, timeout), timeout)
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"Content-Type": "application/json", "User-Agent": "firehose-relay"})

    @classmethod
    def from_settings(cls, settings: Settings) -> ReferencePartnerClient:
        """How workers/runtime.py builds the client PARTNER_CLIENT names."""
        return cls(settings.partner_api_url, settings.partner_timeout_seconds)

    def send(self, operation: Operation, idempotency_key: str) -> PartnerResult:
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
            excerpt = response.text[:4096].replace(operation.api_key, "[redacted]")[:200]
            error = f"HTTP {response.status_code}: {excerpt}"
        return PartnerResult(
            response.status_code,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            error=error,
        )
