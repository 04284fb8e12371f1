"""The inbound `Authorization: Token <token>` check, and the rule that the web never runs open by accident."""

from __future__ import annotations

import hmac
import logging

from common.config import Settings, SettingsError

# Said once here so that gunicorn.conf.py's exit line, the app factory's error and the docs agree.
NO_TOKEN_PROBLEM = (
    "FIREHOSE_AUTH_TOKEN: not set, so the web refuses to start (anyone could queue messages). "
    "Set it to the token mParticle sends (comma-separate several), or set FIREHOSE_AUTH_DISABLED=true "
    "to run open (local use only)."
)


def usable_tokens(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """The configured tokens that can match a header: a blank one never can, so it counts as none."""
    return tuple(token for token in tokens if token.strip())


def runs_open(settings: Settings) -> bool:
    """True when the Firehose endpoint takes messages without a token: only by explicit opt-out.

    A configured token always wins over FIREHOSE_AUTH_DISABLED, so a stale opt-out left in an
    environment that also has a token cannot open the door.
    """
    return settings.auth_disabled and not usable_tokens(settings.auth_tokens)


def require_token_or_opt_out(settings: Settings) -> None:
    """Refuse to serve without a token unless the opt-out is set (SettingsError, one line)."""
    if not usable_tokens(settings.auth_tokens) and not settings.auth_disabled:
        raise SettingsError([NO_TOKEN_PROBLEM])


def warn_if_open(settings: Settings, log: logging.Logger) -> None:
    """A warning at every start of a web that runs open, so it is never open unnoticed."""
    if runs_open(settings):
        log.warning(
            "FIREHOSE_AUTH_DISABLED=true and no FIREHOSE_AUTH_TOKEN: the Firehose endpoint accepts every "
            "message without a token. For local use only.",
            extra={"event": "auth_disabled"},
        )
    elif settings.auth_disabled:
        log.warning(
            "FIREHOSE_AUTH_DISABLED=true is ignored: FIREHOSE_AUTH_TOKEN is set and required.",
            extra={"event": "auth_disabled_ignored"},
        )


def request_is_authorized(header: str | None, settings: Settings) -> bool:
    """Whether a request may send more than a registration: a valid token, or the explicit opt-out.

    Without a token and without the opt-out nothing is authorized (fail closed), whichever way
    the app was built.
    """
    return runs_open(settings) or token_is_valid(header, usable_tokens(settings.auth_tokens))


def token_is_valid(header: str | None, tokens: tuple[str, ...]) -> bool:
    """True when the header carries one of the configured tokens; never when none is configured.

    Every configured token is compared in constant time, and all of them are compared,
    so the answer time says nothing about which one nearly matched.
    """
    if not tokens or not header:
        return False
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "token" or not presented.strip():
        return False
    candidate = presented.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token.encode())
    return matched
