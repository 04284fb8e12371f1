"""Keeps secrets and personal data out of logs and listings: the one place that knows what a secret
looks like (a settings value, a token, in any encoding it may be echoed in) and how a logged value
is kept to one line."""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

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


# ------------------------------------------------------------- secrets in any encoding

# Shorter "secrets" would redact ordinary words; a real token or API key is never this short.
MIN_SECRET_LENGTH = 6


def _json_forms(text: str) -> set[str]:
    # As one JSON string body, ASCII-only or not, with "/" escaped or not, and once more
    # (JSON inside a JSON string): how a partner's JSON error body may quote what it was sent.
    once = {json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
    once |= {form.replace("/", "\\/") for form in once}
    twice = {json.dumps(form)[1:-1] for form in once}
    return once | twice


def _url_forms(text: str) -> set[str]:
    forms = {quote(text, safe=""), quote(text, safe="/"), quote_plus(text, safe=""), quote_plus(text, safe="/")}
    # Percent escapes are case-insensitive; some encoders write them in lower case.
    return forms | {re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), form) for form in forms}


def _base64_forms(text: str) -> set[str]:
    """The base64 characters that stand for the secret alone, wherever it sits in the encoded text.

    Base64 turns 3 bytes into 4 characters, so a secret at byte offset 0, 1 or 2 (mod 3) of
    the encoded data comes out as one of three different strings. For each, the characters
    whose 6 bits all come from the secret are fixed whatever surrounds it: those are matched.
    The at most two characters at either end that mix in neighbouring bytes stay; they carry
    at most 4 bits of the secret.
    """
    raw = text.encode()
    forms: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        first = -(-8 * offset // 6)  # the first character that starts inside the secret
        last = 8 * (offset + len(raw)) // 6  # one past the last character that ends inside it
        core = encoded[first:last]
        forms |= {core, core.translate(_URLSAFE)}
    return forms


_URLSAFE = str.maketrans("+/", "-_")


@functools.lru_cache(maxsize=1024)
def secret_forms(secret: str) -> tuple[str, ...]:
    """`secret` as written plain, JSON-escaped, URL-encoded and base64-encoded, longest first.

    These are the ways a partner has been seen to echo a credential back (an error body
    quoting the request, a URL, a Basic header, a base64 blob of the request).
    """
    if len(secret) < MIN_SECRET_LENGTH:
        return ()
    forms = {secret} | _json_forms(secret) | _url_forms(secret) | _base64_forms(secret)
    return tuple(sorted((f for f in forms if len(f) >= MIN_SECRET_LENGTH), key=lambda f: (-len(f), f)))


def all_secret_forms(secrets: Iterable[str]) -> tuple[str, ...]:
    """Every form of every secret, longest first, so a form containing another is replaced whole."""
    forms = {form for secret in secrets if secret for form in secret_forms(secret)}
    return tuple(sorted(forms, key=lambda f: (-len(f), f)))


def redact_forms(text: str, forms: Iterable[str]) -> str:
    """`text` with each of `forms` (from `all_secret_forms`) replaced."""
    for form in forms:
        if form in text:
            text = text.replace(form, REDACTED)
    return text


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced in any of the forms `secret_forms` knows."""
    return redact_forms(text, all_secret_forms(secrets))


def message_secrets(message: Any, max_depth: int = 64) -> set[str]:
    """Every text value inside a message's settings maps (its API key among them), at any depth."""
    found: set[str] = set()
    stack: list[tuple[Any, bool, int]] = [(message, False, 0)]
    while stack:
        value, secret, depth = stack.pop()
        if depth > max_depth:
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((item, secret or key in _SECRET_MAPS, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, secret, depth + 1) for item in value)
        elif secret and isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH:
            found.add(value)
    return found


# ------------------------------------------------------------------- control characters

# C0, DEL, C1, and the two Unicode line separators some terminals and log viewers break on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with every control character written as an escape: it stays on one line and
    cannot move a terminal's cursor, so nothing logged can forge a line of its own."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text
