"""Partner stub: a loopback implementation of the reference partner API (docs/partner-api.md)."""

from devtools.partner_stub.app import (
    StubConfig,
    api_key_sha256,
    create_stub_app,
    get_state,
)

__all__ = ["StubConfig", "api_key_sha256", "create_stub_app", "get_state"]
