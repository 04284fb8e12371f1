"""The inbound `Authorization: Token <token>` check."""

from __future__ import annotations

import hmac


def token_is_valid(header: str | None, tokens: tuple[str, ...]) -> bool:
    """True when no token is configured, or the header carries one of the configured tokens.

    Every configured token is compared in constant time, and all of them are compared,
    so the answer time says nothing about which one nearly matched.
    """
    if not tokens:
        return True
    if not header:
        return False
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "token" or not presented.strip():
        return False
    candidate = presented.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token.encode())
    return matched
