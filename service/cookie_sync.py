"""`GET /cookie-sync`: mParticle's cookie-sync pixel lands here.

mParticle's web SDK loads the partner's pixel URL with mParticle's own redirect URL appended
(URL-encoded) as a query parameter. We read the partner's first-party id cookie (or set a new
one), fill that id into the redirect URL's macro, echo every other parameter, and send the
browser back with a 302. The redirect target must be on an allowed host: anything else would
make this endpoint an open redirect.
"""

from __future__ import annotations

import re
import uuid
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from flask import Blueprint, Response, current_app, redirect, request

from common.config import Settings
from service.errors import ApiError

bp = Blueprint("cookie_sync", __name__)

REDIRECT_PARAM = "redirect"
# What a partner id cookie may hold; anything else is replaced by a fresh id.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_ONE_YEAR = 365 * 24 * 3600


def safe_redirect_target(url: str, allowed_hosts: tuple[str, ...]) -> str:
    """The URL if it is an https URL on an allowed host; raises ApiError 400 otherwise."""
    if not url or any(c in url for c in "\\\r\n\t ") or any(ord(c) < 0x20 for c in url):
        raise ApiError(400, "invalid_redirect", "The redirect URL is missing or malformed.")
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or "@" in parts.netloc or not host:
        raise ApiError(400, "invalid_redirect", "The redirect URL must be an absolute https URL.")
    entries = [entry.lower() for entry in allowed_hosts]
    allowed = any(host == entry or (entry.startswith(".") and host.endswith(entry)) for entry in entries)
    if not allowed:
        raise ApiError(400, "redirect_not_allowed", f"Redirects to '{host[:100]}' are not allowed.")
    return url


def fill_redirect(url: str, partner_id: str, macro: str, extra: list[tuple[str, str]]) -> str:
    """The redirect URL with the partner id in place of the macro (or appended) and `extra` echoed."""
    encoded_id = quote(partner_id, safe="")
    if macro and macro in url:
        url = url.replace(macro, encoded_id)
    else:
        extra = [("partner_id", partner_id), *extra]
    if not extra:
        return url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + extra
    return urlunsplit(parts._replace(query=urlencode(query)))


@bp.get("/cookie-sync")
def cookie_sync() -> Response:
    settings: Settings = current_app.config["SETTINGS"]
    target = safe_redirect_target(request.args.get(REDIRECT_PARAM, ""), settings.cookie_sync_allowed_hosts)
    cookie = request.cookies.get(settings.cookie_sync_cookie, "")
    partner_id = cookie if _SAFE_ID.match(cookie) else uuid.uuid4().hex
    extra = [(k, v) for k, v in request.args.items(multi=True) if k != REDIRECT_PARAM]
    response = redirect(fill_redirect(target, partner_id, settings.cookie_sync_macro, extra), code=302)
    response.headers["Cache-Control"] = "no-store"
    if partner_id != cookie:
        # SameSite=None: the pixel is a third-party request from the customer's page.
        response.set_cookie(
            settings.cookie_sync_cookie,
            partner_id,
            max_age=_ONE_YEAR,
            secure=True,
            httponly=True,
            samesite="None",
        )
    return response
