"""Keeps secrets and personal data out of logs and listings."""

from __future__ import annotations

from typing import Any

REDACTED = "[redacted]"

# Every value of these maps is customer configuration and may be a credential.
_SECRET_MAPS = ("account_settings", "audience_subscription_settings", "previous_audience_subscription_settings")


def redact_message(message: Any) -> Any:
    """A copy of a Firehose message with every settings value replaced, at any depth."""
    if isinstance(message, dict):
        out = {}
        for key, value in message.items():
            if key in _SECRET_MAPS and isinstance(value, dict):
                out[key] = {k: REDACTED for k in value}
            else:
                out[key] = redact_message(value)
        return out
    if isinstance(message, list):
        return [redact_message(item) for item in message]
    return message
