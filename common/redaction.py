"""Keeps secrets and personal data out of logs and listings."""

from __future__ import annotations

from typing import Any

REDACTED = "[redacted]"

# Every value of these maps is customer configuration and may be a credential.
_SECRET_MAPS = ("account_settings", "audience_subscription_settings", "previous_audience_subscription_settings")


TOO_DEEP = "[nested too deep to show]"


def redact_message(message: Any, max_depth: int | None = None) -> Any:
    """A copy of a Firehose message with every settings value replaced, at any depth.

    Walks with its own stack rather than recursion: a message may nest 1,024 levels deep
    (as deep as the JSON parser goes), past Python's recursion limit. With `max_depth`,
    containers nested deeper are replaced by a marker, so the copy can be printed.
    """
    holder: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(message, holder, 0, 0)]
    while stack:
        value, parent, slot, depth = stack.pop()
        if max_depth is not None and depth > max_depth and isinstance(value, dict | list):
            parent[slot] = TOO_DEEP
        elif isinstance(value, dict):
            copy: dict[Any, Any] = {}
            for key, item in value.items():
                if key in _SECRET_MAPS and isinstance(item, dict):
                    copy[key] = {k: REDACTED for k in item}
                else:
                    copy[key] = None  # keeps the key order; filled in from the stack
                    stack.append((item, copy, key, depth + 1))
            parent[slot] = copy
        elif isinstance(value, list):
            items: list[Any] = [None] * len(value)
            stack.extend((item, items, index, depth + 1) for index, item in enumerate(value))
            parent[slot] = items
        else:
            parent[slot] = value
    return holder[0]
